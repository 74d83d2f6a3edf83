"""Shared deployments: ingress processes of one namespace share one set of replicas.

Real processes on a real ``LocalCluster`` on 127.0.0.1: ingress processes started with
subprocess (and by ``hypercorn --workers 2``), Dask workers killed with SIGKILL. The cross-host
test (network namespaces, a link cut under load) is tests/dask/test_netns.py.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import httpx
import pytest

import embserve
from embserve_dask import DaskBackend
from tests.dask.clusters import three_workers
from tests.dask.ingress import Echo
from tests.processes import alive
from tests.waiting import wait_for, wait_until

ROOT = Path(__file__).resolve().parents[2]

# distributed's constructors are untyped; tests use them through this name.
Client: Any = distributed.Client


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three worker processes (with nannies) on 127.0.0.1."""
    yield from three_workers()


def _replica_tasks(client: Any) -> list[str]:
    # The Dask tasks holding replicas: one per replica, however many runtimes route to it.
    def keys(dask_scheduler: Any) -> list[str]:
        return [str(k) for k in dask_scheduler.tasks if str(k).startswith("embserve-")]

    found: list[str] = client.run_on_scheduler(keys)
    return found


def _members(client: Any, namespace: str) -> int:
    def count(dask_scheduler: Any, namespace: str) -> int:
        plugin = dask_scheduler.plugins.get("embserve-registry")
        ns = plugin.namespaces.get(namespace) if plugin is not None else None
        return 0 if ns is None else len(ns.members)

    found: int = client.run_on_scheduler(count, namespace=namespace)
    return found


def _env(cluster: Any, namespace: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EMBSERVE_TEST_SCHEDULER": cluster.scheduler_address,
        "EMBSERVE_TEST_NAMESPACE": namespace,
    }


def _seen(url: str, calls: int = 24) -> dict[str, int]:
    """Replica id -> Dask worker pid, over ``calls`` requests (503s while replicas change)."""
    seen: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(calls):
            response = http.get("/echo")
            if response.status_code == 200:
                body = response.json()
                seen[body["replica"]] = body["worker_pid"]
    return seen


class _Ingress:
    """One ingress process (``python -m tests.dask.ingress``); ends when its stdin closes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.dask.ingress"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), f"the ingress did not start: {self.url!r}"

    def exit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.mark.parametrize("first_goes", ["exits", "is killed"])
def test_two_ingress_processes_share_one_set_of_replicas(cluster: Any, first_goes: str) -> None:
    env = _env(cluster, f"bar-{first_goes}")
    with Client(cluster.scheduler_address) as client:
        first = _Ingress(env)
        second: _Ingress | None = None
        try:
            second = _Ingress(env)
            assert _members(client, f"bar-{first_goes}") == 2
            by_first, by_second = _seen(first.url), _seen(second.url)
            assert len(by_first) == 2, by_first
            assert by_second == by_first  # the same two replicas, not two sets
            assert len(_replica_tasks(client)) == 2

            # Its owner goes (a clean exit, or SIGKILL: its client's removal ends its lease),
            # and the second takes the deployment over.
            first.exit() if first_goes == "exits" else first.kill()
            wait_until(lambda: _members(client, f"bar-{first_goes}") == 1, 10)
            # Still serving, with the same replicas (on a loaded machine a few calls may all
            # land on one of them while the second takes over: look again until the deadline).
            wait_until(lambda: _seen(second.url, 8).keys() == by_first.keys(), 10)

            victim, worker_pid = next(iter(by_first.items()))
            os.kill(worker_pid, signal.SIGKILL)
            wait_until(lambda: not alive(worker_pid), 10)

            def two_again() -> dict[str, int] | None:
                seen = _seen(second.url, 12)
                return seen if len(seen) == 2 and victim not in seen else None

            replaced = wait_for(two_again, 30, 0.05) or {}
            assert set(replaced) - set(by_first)  # a new replica, started by the second
            wait_until(lambda: len(_replica_tasks(client)) == 2, 10)
        finally:
            first.kill()
            if second is not None:
                second.kill()
        wait_until(lambda: not _replica_tasks(client), 20)  # nothing outlives its runtimes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_hypercorn_workers_share_one_set_of_replicas(cluster: Any) -> None:
    port = _free_port()
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    server = subprocess.Popen(
        [hypercorn, "--workers", "2", "--bind", f"127.0.0.1:{port}", "tests.dask.ingress:app"],
        env=_env(cluster, "hypercorn"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(cluster.scheduler_address) as client:
            wait_until(lambda: _members(client, "hypercorn") == 2, 60)

            def answering() -> bool:
                try:
                    return httpx.get(f"{url}/echo", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(answering, 60)
            seen: dict[str, int] = {}
            wait_until(lambda: len(seen.update(_seen(url, 16)) or seen) == 2, 20)
            assert len(_replica_tasks(client)) == 2  # two ingress processes, two replicas
            _stop(server)
            wait_until(lambda: not _replica_tasks(client), 20)  # gone with their runtimes
    finally:
        _stop(server)


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# -- in one process: two runtimes of a namespace ------------------------------------------


@embserve.deployment(num_replicas=1, version="2")
class EchoTwo:
    """A second version of ``Echo`` (another class, another version)."""

    def __call__(self, request: Any = None) -> dict[str, Any]:
        return {"replica": embserve.get_replica_context().replica_id, "version": 2}


@pytest.fixture
def pair(cluster: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """Two runtimes of one namespace (named after the test)."""
    namespace = request.node.name
    with (
        embserve.Runtime(DaskBackend(cluster), namespace=namespace) as a,
        embserve.Runtime(DaskBackend(cluster), namespace=namespace) as b,
    ):
        yield a, b


def test_started_elsewhere_is_reachable_by_name(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.run(Echo.bind(), name="echo")
    handle = b.get_handle("echo")  # b never ran it
    replicas = {handle.remote().result(timeout_s=10)["replica"] for _ in range(20)}
    assert len(replicas) == 2
    assert b.status().deployments["echo"].running_replicas == 2


def test_traffic_set_by_one_runtime_is_routed_by_the_other(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.run(Echo.bind(), name="echo")
    a.run(EchoTwo.bind(), name="two")
    b.run(Echo.bind(), name="echo")
    a.set_traffic("echo", {"two": 1.0})

    def routed() -> bool:
        return bool(b.get_handle("echo").remote().result(timeout_s=10).get("version") == 2)

    wait_until(routed, 5)  # how soon: benchmarks/scaling.py (registry_update)
    assert b.status().endpoints["echo"].traffic == {"two": 1.0}


def test_a_new_version_from_a_follower_is_rolled_out_for_both(pair: tuple[Any, Any]) -> None:
    a, b = pair
    a.run(Echo.bind(), name="echo")  # a owns it
    b.run(Echo.bind(), name="echo")
    before = {r.replica_id for r in a.status().deployments["echo"].replicas}
    b.run(EchoTwo.options(name="Echo").bind(), name="echo", timeout_s=30)  # waits for it

    def replaced(rt: embserve.Runtime) -> bool:
        now = {r.replica_id for r in rt.status().deployments["echo"].replicas}
        return bool(now) and not now & before

    for rt in (a, b):
        wait_until(functools.partial(replaced, rt), 10)
        assert rt.get_handle("echo").remote().result(timeout_s=10)["version"] == 2


def test_two_runtimes_starting_together_start_one_set(cluster: Any, pair: tuple[Any, Any]) -> None:
    import concurrent.futures

    a, b = pair
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(rt.run, Echo.bind(), name="echo") for rt in (a, b)]
        for run in runs:
            run.result(timeout=60)
    ids = [{r.replica_id for r in rt.status().deployments["echo"].replicas} for rt in (a, b)]
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_a_backend_that_shares_nothing_refuses_a_namespace() -> None:
    rt = embserve.Runtime("local", namespace="prod")
    with pytest.raises(ValueError, match="cannot share replicas"):
        rt.start()
    assert not embserve.backends.LocalBackend().shares_replicas
    backend = DaskBackend("tcp://127.0.0.1:1")
    assert not backend.shares_replicas
    backend.use_namespace("prod")
    assert backend.shares_replicas


def test_a_deployment_deleted_by_a_follower_goes_everywhere(
    cluster: Any, pair: tuple[Any, Any]
) -> None:
    a, b = pair
    a.run(Echo.bind(), name="echo")  # a owns it
    b.run(Echo.bind(), name="echo")
    with Client(cluster.scheduler_address) as client:
        ours = {r.replica_id for r in a.status().deployments["echo"].replicas}
        assert len(ours) == 2

        def tasks_left() -> set[str]:
            return {rid for rid in ours if any(rid in key for key in _replica_tasks(client))}

        assert tasks_left() == ours
        b.delete("echo")
        wait_until(lambda: "echo" not in a.status().deployments, 5)
        with pytest.raises(KeyError):
            a.get_handle("echo")
        wait_until(lambda: not tasks_left(), 20)  # its owner stopped the replicas


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["app", "options"])
def test_embserve_run_workers_share_one_set_of_replicas(cluster: Any, how: str) -> None:
    """``embserve run --workers 2``: an App whose runtime has a namespace, or a deployment
    served with ``--backend dask://... --namespace``; two ingress processes, two replicas."""
    namespace = f"run-workers-{how}"
    port = _free_port()
    embserve_cli = str(Path(sys.executable).with_name("embserve"))
    if how == "app":
        target, route, extra = "tests.dask.ingress:app", "/echo", []
    else:
        target, route = "tests.dask.ingress:Echo", "/"
        extra = ["--backend", cluster.scheduler_address, "--namespace", namespace]
    command = [embserve_cli, "run", target, "--workers", "2", "--port", str(port), *extra]
    server = subprocess.Popen(
        command,
        env=_env(cluster, namespace),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = wait_for(lambda: server.stdout.readline() if server.stdout else "", 90)
        while "serving on" not in banner and server.poll() is None:  # routes come after it
            banner = server.stdout.readline()
        assert "serving on" in banner and "2 workers" in banner, banner
        with Client(cluster.scheduler_address) as client:
            assert _members(client, namespace) == 2
            seen: set[str] = set()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

                def both() -> bool:
                    response = http.get(route)
                    if response.status_code == 200:
                        seen.add(response.json()["replica"])
                    return len(seen) == 2

                wait_until(both, 20)
            assert len(_replica_tasks(client)) == 2  # two ingress processes, two replicas
    finally:
        _stop(server)  # type: ignore[arg-type]
