"""Three hosts on this machine, made as network namespaces: a scheduler on one, a Dask worker on
each of the others, two ingress runtimes (in this process, in the root namespace) sharing one
namespace's replicas. One worker host is cut off (its link down) under load and restored: no
retried request is lost, the replica it held is placed again, and both runtimes converge on
the same replicas.

The hosts are joined by a bridge in the root namespace, each with its own address on a /24 of
10.213.0.0/16 chosen from this process's id. Every namespace and link is named after the
process id, removed in ``finally``, and left-overs of a killed earlier run (whose process is
gone) are removed first. Needs root (``ip netns``); skipped with the reason where not allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import pytest

import embserve
from embserve_dask import DaskBackend
from tests.dask.ingress import Echo
from tests.processes import alive
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).with_name("dask"))
# distributed's constructors are untyped; tests use them through this name.
Client: Any = distributed.Client
_HOSTS = ("s", "w1", "w2")  # the scheduler's host, two worker hosts
_LINK = re.compile(r"^es([0-9a-z]+)(br|s|w1|w2)$")
_NETNS = re.compile(r"^embserve-([0-9a-z]+)-(s|w1|w2)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _tag(pid: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        pid, rest = divmod(pid, 36)
        out = digits[rest] + out
        if not pid:
            return out


def _pid_of(tag: str) -> int:
    return int(tag, 36)


def _why_not() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"embserve-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _remove_leftovers() -> None:
    # Of earlier runs that were killed before their clean-up: their process is gone.
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        found = _LINK.match(name)
        if found and not alive(_pid_of(found.group(1))):
            _ip("link", "del", name, check=False)
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = _NETNS.match(name)
        if (found and not alive(_pid_of(found.group(1)))) or name.startswith("embserve-probe-"):
            _ip("netns", "del", name, check=False)


class _Hosts:
    """Three namespaces on one bridge; ``address[host]`` is each one's address."""

    def __init__(self) -> None:
        self.tag = _tag(os.getpid())
        subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.bridge = f"es{self.tag}br"
        self.netns = {h: f"embserve-{self.tag}-{h}" for h in _HOSTS}
        self.link = {h: f"es{self.tag}{h}" for h in _HOSTS}  # the root side of each veth
        self.address = {h: f"{subnet}.{i + 1}" for i, h in enumerate(_HOSTS)}
        self.root_address = f"{subnet}.254"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in _HOSTS:
            ns, link, peer = self.netns[host], self.link[host], f"{self.link[host]}p"
            _ip("netns", "add", ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "set", link, "master", self.bridge)
            _ip("link", "set", link, "up")

    def remove(self) -> None:
        for host in _HOSTS:
            _ip("link", "del", self.link[host], check=False)
            _ip("netns", "del", self.netns[host], check=False)
        _ip("link", "del", self.bridge, check=False)

    def cut(self, host: str) -> None:
        _ip("link", "set", self.link[host], "down")

    def restore(self, host: str) -> None:
        _ip("link", "set", self.link[host], "up")


def _spawn(ns: str, args: list[str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # The scheduler gives up on a silent worker after 2 s, not 5 minutes.
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "2s",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s",  # the least distributed allows
    }
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the nanny's worker goes with it
    )


@pytest.fixture
def hosts() -> Iterator[_Hosts]:
    """The three hosts, removed afterwards (and any left over by a killed run first)."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(f"the multi-host test needs network namespaces: {reason}")
    _remove_leftovers()
    made = _Hosts()
    try:
        made.create()
        yield made
    finally:
        made.remove()


class _Load:
    """Threads calling through both runtimes; each request is retried until it succeeds."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles
        self.done = threading.Event()
        self.served = 0
        self.retried = 0
        self.lost: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(h,), daemon=True) for h in handles]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _run(self, handle: Any) -> None:
        while not self.done.is_set():
            errors: list[str] = []
            for _ in range(40):  # bounded: a request lost is one that never succeeded
                try:
                    handle.remote().result(timeout_s=5)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                break
            with self._lock:
                if len(errors) == 40:
                    self.lost.append(errors[-1])
                else:
                    self.served += 1
                    self.retried += bool(errors)

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(60)


def _running(rt: embserve.Runtime) -> dict[str, str]:
    """Replica id -> the host address of its worker, for the replicas ``rt`` routes to."""
    status = rt.status().deployments["Echo"]
    return {
        r.replica_id: str(r.info.get("worker", "")).split("//")[-1].rsplit(":", 1)[0]
        for r in status.replicas
        if r.state.value == "RUNNING"
    }


def test_a_worker_host_cut_off_under_load_and_restored(hosts: _Hosts) -> None:
    scheduler = f"tcp://{hosts.address['s']}:8786"
    processes = [
        _spawn(
            hosts.netns["s"],
            [DASK, "scheduler", "--host", hosts.address["s"], "--port", "8786", "--no-dashboard"],
        )
    ]
    runtimes: list[embserve.Runtime] = []
    load: _Load | None = None
    try:

        def worker(host: str) -> subprocess.Popen[bytes]:
            process = _spawn(
                hosts.netns[host],
                [
                    DASK,
                    "worker",
                    scheduler,
                    "--host",
                    hosts.address[host],
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--death-timeout",
                    "60",
                ],
            )
            processes.append(process)
            return process

        worker("w1")
        worker("w2")
        with Client(scheduler, timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
            for _ in range(2):
                rt = embserve.Runtime(DaskBackend(scheduler), namespace="netns")
                runtimes.append(rt.start())
            a, b = runtimes
            a.run(Echo.bind(), timeout_s=30)
            b.run(Echo.bind(), timeout_s=30)
            wait_until(lambda: len(_running(b)) == 2, 10)
            before = _running(a)
            assert before == _running(b)
            assert set(before.values()) == {hosts.address["w1"], hosts.address["w2"]}

            load = _Load([a.get_handle("Echo"), b.get_handle("Echo")])
            load.start()
            wait_until(lambda: load is not None and load.served >= 20, 10)

            hosts.cut("w1")

            def moved(rt: embserve.Runtime) -> bool:
                now = _running(rt)
                return len(now) == 2 and hosts.address["w1"] not in now.values()

            wait_until(lambda: moved(a) and moved(b), 20)  # placed again, on w2
            served = load.served
            wait_until(lambda: load is not None and load.served >= served + 20, 10)

            hosts.restore("w1")
            # The cut-off worker hears it was removed, and closes (its teardown waits for the
            # replica it held, which its runtimes already replaced); a new worker joins from
            # the host, as its supervisor (Kubernetes, a batch system) would start one.
            worker("w1")
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 20)
            served = load.served
            wait_until(lambda: load is not None and load.served >= served + 20, 10)
            load.stop()

            assert load.lost == [], load.lost[:3]
            after = _running(a)
            assert after == _running(b)  # the runtimes converged on the same replicas
            assert len(after) == 2 and set(after) != set(before)
    finally:
        if load is not None:
            load.stop()
        for rt in runtimes:
            rt.shutdown()
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
