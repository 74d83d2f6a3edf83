"""A sync deployment whose HTTP client left: its thread keeps the replica's slot until it ends,
so new requests go to a replica with room instead of queueing behind it (real hypercorn)."""

from __future__ import annotations

import contextlib
import threading

import httpx

import embserve
from tests.e2e.servers import hypercorn_server
from tests.waiting import wait_until

gate = threading.Event()
entered = threading.Event()


@embserve.deployment(num_replicas=2, max_ongoing_requests=1)
def blocking(request: object) -> str:
    if not entered.is_set():
        entered.set()
        gate.wait(30)
    return embserve.get_replica_context().replica_id


def test_a_client_that_left_does_not_free_the_slot_of_a_running_thread() -> None:
    gate.clear()
    entered.clear()
    app = embserve.App({"/block": blocking})
    with hypercorn_server(app) as url, httpx.Client(base_url=url) as client:
        with contextlib.suppress(httpx.TimeoutException):  # the client leaves; the thread runs on
            client.post("/block", timeout=httpx.Timeout(0.5))
        assert entered.wait(10)

        def ongoing() -> dict[str, int]:
            replicas = app.runtime.status().deployments["blocking"].replicas
            return {r.replica_id: r.ongoing_requests for r in replicas}

        def served_over_http() -> bool:
            metrics = client.get("/-/metrics").text
            return 'embserve_http_requests_in_flight{endpoint="blocking"} 0.0' in metrics

        wait_until(served_over_http)  # the server saw the client leave and cancelled it
        assert sum(ongoing().values()) == 1  # but its thread runs on, holding its slot
        (busy,) = [rid for rid, count in ongoing().items() if count]
        for _ in range(10):
            response = client.post("/block", timeout=10)
            assert response.status_code == 200 and response.text != busy
        gate.set()
        wait_until(lambda: sum(ongoing().values()) == 0)
