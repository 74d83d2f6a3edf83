"""Sync callers: a plain thread calling sync user code on an in-process replica runs it in its
own thread, under the same admission, queueing, timeouts and metrics as calls through the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from tests.test_metrics import samples, value


class Gate:
    """User code that waits for the test: ``hold()`` blocks until :meth:`open` (bounded)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.opened.wait(10), "the test never opened the gate"

    def open(self) -> None:
        self.opened.set()


gates: dict[str, Gate] = {}


@embserve.deployment(max_ongoing_requests=2)
class Where:
    """Says which thread ran each call; ``hold`` waits at a gate."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self, x: int) -> tuple[int, int]:
        return x, threading.get_ident()

    def counted(self, x: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.0005)  # long enough for calls to overlap if admission let them
        with self.lock:
            self.now -= 1
        return x

    def most_at_once(self) -> int:
        return self.most

    def hold(self, name: str) -> int:
        gates[name].hold()
        return threading.get_ident()

    def fail(self) -> None:
        raise KeyError("missing")

    async def on_loop(self) -> int:
        return threading.get_ident()


def test_a_thread_runs_sync_code_in_itself_and_async_code_stays_on_the_loop() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Where.bind())
        me = threading.get_ident()
        answers = [handle.remote(i).result() for i in range(6)]
        assert [x for x, _ in answers] == list(range(6))
        # The first call turns the shared counts on; after it, a thread whose result() comes
        # within the grace time runs its call itself (a stall of the machine may lose one).
        assert sum(thread == me for _, thread in answers[1:]) >= 4
        assert handle.on_loop.remote().result() != me


def test_max_ongoing_requests_holds_across_threads_and_every_call_is_answered() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Where.bind())
        answers: dict[int, list[int]] = {}

        def caller(n: int) -> None:
            answers[n] = [handle.counted.remote(n * 100 + i).result() for i in range(25)]

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == {n: [n * 100 + i for i in range(25)] for n in range(8)}
        assert handle.most_at_once.remote().result() <= 2
        found = samples(rt.metrics())
        assert value(found, "embserve_requests_total", deployment="Where", outcome="ok") >= 200


def test_a_thread_call_holds_its_slot_status_shows_it_and_a_full_replica_queues() -> None:
    gates["slot"] = gate = Gate()
    with embserve.Runtime() as rt:
        handle = rt.run(Where.options(max_ongoing_requests=1, max_queued_requests=0).bind())
        handle.remote(0).result()  # the first call turns the shared counts on
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(handle.hold.remote("slot").result()))
        thread.start()
        assert gate.entered.wait(10)
        assert rt.status().deployments["Where"].replicas[0].ongoing_requests == 1
        with pytest.raises(embserve.BackPressureError):
            handle.remote(1).result()  # the one slot is taken and nobody may queue
        gate.open()
        thread.join(10)
        assert result == [thread.ident]  # the caller's own thread ran it
        assert handle.remote(2).result()[0] == 2


def test_a_deployment_with_a_timeout_runs_in_its_threads_and_times_out() -> None:
    gates["late"] = gate = Gate()
    with embserve.Runtime() as rt:
        handle = rt.run(Where.options(request_timeout_s=0.1).bind())
        began = time.monotonic()
        with pytest.raises(embserve.RequestTimeoutError):
            handle.hold.remote("late").result()
        assert time.monotonic() - began < 5
        gate.open()


def test_user_errors_reach_the_thread_with_their_type() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Where.bind())
        with pytest.raises(KeyError, match="missing"):
            handle.fail.remote().result()
        assert handle.remote(3).result()[0] == 3  # the slot was given back


def test_a_response_nobody_reads_still_runs_and_fan_out_runs_at_once() -> None:
    gates["unread"] = gate = Gate()
    with embserve.Runtime() as rt:
        handle = rt.run(Where.options(max_ongoing_requests=4).bind())
        unread = handle.hold.remote("unread")
        assert gate.entered.wait(10)  # started although nothing asked for it
        gate.open()
        assert unread.result() != threading.get_ident()  # the loop started it after its grace
        gates.update({f"fan{i}": Gate() for i in range(3)})
        fan = [handle.hold.remote(f"fan{i}") for i in range(3)]
        for i in range(3):  # each runs before any is read: none waits for another's result
            assert gates[f"fan{i}"].entered.wait(10)
        for i in range(3):
            gates[f"fan{i}"].open()
        assert len([r.result() for r in fan]) == 3


def test_responses_from_threads_work_from_other_threads_and_loops() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Where.bind())
        response = handle.remote(7)
        got: list[Any] = []
        other = threading.Thread(target=lambda: got.append(response.result()))
        other.start()
        other.join(10)
        assert got[0][0] == 7
        assert response.result() == got[0]  # read again: the same answer
        awaited = handle.remote(8)

        async def wait() -> Any:
            return await awaited

        assert asyncio.run(wait())[0] == 8
        cancelled = handle.remote(9)
        if cancelled.cancel():
            with pytest.raises(asyncio.CancelledError):
                cancelled.result()
        assert handle.remote(10).result(timeout_s=5)[0] == 10  # a timeout: through the loop


def test_shutdown_waits_for_a_call_running_in_a_thread() -> None:
    gates["drain"] = gate = Gate()
    rt = embserve.Runtime()
    handle = rt.run(Where.options(graceful_shutdown_timeout_s=10).bind())
    handle.remote(0).result()  # the first call turns the shared counts on
    result: list[int] = []
    caller = threading.Thread(target=lambda: result.append(handle.hold.remote("drain").result()))
    caller.start()
    assert gate.entered.wait(10)
    stopped = threading.Event()

    def stop() -> None:
        rt.shutdown()
        stopped.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert not stopped.wait(0.2)  # draining: the call in the thread still holds its slot
    gate.open()
    assert stopped.wait(10)
    caller.join(10)
    stopper.join(10)
    assert result == [caller.ident]


@settings(max_examples=10, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=3),
    threads=st.integers(min_value=1, max_value=6),
    calls=st.integers(min_value=1, max_value=15),
    on_loop=st.integers(min_value=0, max_value=10),
)
def test_every_request_is_answered_exactly_once(
    limit: int, threads: int, calls: int, on_loop: int
) -> None:
    """Thread callers and loop callers together: each answer once, to its own caller, and no
    more than ``limit`` at once."""
    with embserve.Runtime() as rt:
        handle = rt.run(Where.options(max_ongoing_requests=limit).bind())
        answers: list[int] = []
        lock = threading.Lock()

        def caller(n: int) -> None:
            for i in range(calls):
                got = handle.counted.remote(n * 1000 + i).result()
                with lock:
                    answers.append(got)

        async def loop_calls() -> list[int]:
            return list(
                await asyncio.gather(*(handle.counted.remote(-1 - i) for i in range(on_loop)))
            )

        assert rt.loop is not None
        from_loop = asyncio.run_coroutine_threadsafe(loop_calls(), rt.loop)
        run_all(caller, threads)
        assert sorted(from_loop.result(30)) == sorted(-1 - i for i in range(on_loop))
        expected = [n * 1000 + i for n in range(threads) for i in range(calls)]
        assert sorted(answers) == expected
        assert handle.most_at_once.remote().result() <= limit


def run_all(target: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


def test_a_call_left_unstarted_at_shutdown_is_answered_plainly() -> None:
    rt = embserve.Runtime()
    handle = rt.run(Where.bind())
    handle.remote(0).result()  # the first call turns the shared counts on
    unread = handle.remote(1)  # mostly, its grace time has not passed when the runtime stops
    rt.shutdown()
    try:
        value = unread.result(timeout_s=5)
    except embserve.EmbserveError as exc:  # not a closed loop's RuntimeError, nor a hang
        assert "shut down" in str(exc)
    else:
        assert value[0] == 1  # the loop started it before the runtime stopped
