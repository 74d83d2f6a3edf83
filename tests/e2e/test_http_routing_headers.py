"""Routing options over HTTP: ``embserve-priority``, ``embserve-routing-key`` and the model id
headers do what ``handle.options(...)`` does (real hypercorn, httpx)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from starlette.requests import Request

import embserve
from tests.e2e.servers import hypercorn_server
from tests.waiting import wait_until

gate = threading.Event()
served: list[int] = []


@embserve.deployment(max_ongoing_requests=1)
def ordered(request: Request) -> int:
    priority = embserve.get_request_context().priority
    if priority == 99:  # the first request holds the replica until the test lets it go
        gate.wait(30)
    served.append(priority)
    return priority


@embserve.deployment(num_replicas=4, router="consistent_hash")
def sticky(request: Request) -> dict[str, str]:
    context = embserve.get_request_context()
    return {
        "replica": embserve.get_replica_context().replica_id,
        "key": context.routing_key or "",
        "model": context.multiplexed_model_id,
    }


def test_waiting_http_requests_are_served_highest_priority_first() -> None:
    gate.clear()
    served.clear()
    app = embserve.App({"/ordered": ordered})
    with hypercorn_server(app) as url, ThreadPoolExecutor(8) as pool:

        def post(priority: int) -> int:
            response = httpx.post(
                f"{url}/ordered", headers={"embserve-priority": str(priority)}, timeout=30
            )
            assert response.status_code == 200, response.text
            return int(response.text)

        blocker = pool.submit(post, 99)
        wait_until(lambda: app.runtime.status().deployments["ordered"].replicas[0].ongoing_requests)
        waiting = [pool.submit(post, p) for p in (0, 2, -1, 2, 1)]
        wait_until(lambda: app.runtime.status().deployments["ordered"].queued_requests == 5)
        gate.set()
        assert blocker.result() == 99
        assert sorted(f.result() for f in waiting) == [-1, 0, 1, 2, 2]
    assert served == [99, 2, 2, 1, 0, -1]


def test_routing_key_and_model_id_headers() -> None:
    app = embserve.App({"/sticky": sticky})
    with hypercorn_server(app) as url, httpx.Client(base_url=url) as client:
        answers = [
            client.get("/sticky", headers={"embserve-routing-key": f"user-{i % 3}"}).json()
            for i in range(30)
        ]
        by_key: dict[str, set[str]] = {}
        for answer in answers:
            by_key.setdefault(answer["key"], set()).add(answer["replica"])
        assert set(by_key) == {"user-0", "user-1", "user-2"}
        assert all(len(replicas) == 1 for replicas in by_key.values()), by_key
        for header in ("embserve-model-id", "serve_multiplexed_model_id"):
            assert client.get("/sticky", headers={header: "m-1"}).json()["model"] == "m-1"
        bad = client.get("/sticky", headers={"embserve-priority": "high"})
        assert bad.status_code == 400
        assert "embserve-priority must be an integer" in bad.json()["error"]


@embserve.deployment
def version_a(request: Request) -> str:
    return "a"


@embserve.deployment
def version_b(request: Request) -> str:
    return "b"


def test_a_routing_key_keeps_one_version_during_a_split() -> None:
    with embserve.Runtime() as rt:
        rt.run(version_a.bind(), name="split", route_prefix="/split")
        rt.run(version_b.bind(), name="split-b")
        rt.set_traffic("split", {"split": 0.5, "split-b": 0.5})
        with hypercorn_server(rt.asgi_app()) as url, httpx.Client(base_url=url) as client:
            versions: dict[str, set[str]] = {}
            for index in range(80):
                key = f"user-{index % 16}"
                answer = client.get("/split", headers={"embserve-routing-key": key}).text
                versions.setdefault(key, set()).add(answer)
    assert all(len(seen) == 1 for seen in versions.values()), versions
    assert set().union(*versions.values()) == {"a", "b"}
