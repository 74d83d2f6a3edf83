"""The polling selector: a loop that polls a moment before it sleeps, while an answer is due.

Checks the selector against a real socket pair, when it polls and when it does not (nothing
awaited, other threads at work), that it wraps the selector of asyncio's loop on every supported
Python (``loop._selector``, a private name), and that a process replica's caller loop polls only
where its backend says so.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from typing import Any

import pytest

import embserve
from embserve._loop import Awaiting, PollingSelector, new_loop, poll_while, threads_at_work
from embserve.backends import ProcessBackend


class Counting(selectors.DefaultSelector):
    """A real selector that counts the zero-timeout selects, i.e. the polls."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:
            self.polls += 1
        return super().select(timeout)


class Due(Awaiting):
    """A waiter whose answer is due while ``due`` is set."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.due = True

    def awaiting(self) -> bool:
        return self.due


def test_it_returns_what_is_ready_and_keeps_to_its_timeout() -> None:
    here, there = socket.socketpair()
    with here, there, PollingSelector(selectors.DefaultSelector(), 0.01) as selector:
        selector.register(here, selectors.EVENT_READ)
        start = time.monotonic()
        assert selector.select(0.05) == []  # nothing came: it polled, then slept the rest
        assert 0.05 <= time.monotonic() - start < 1.0
        there.send(b"x")
        ready = selector.select(None)
        assert [key.fileobj for key, _ in ready] == [here]
        assert selector.select(0) == ready  # unread data stays ready
        assert selector.get_key(here).fileobj is here
        assert [key.fileobj for key in selector.get_map().values()] == [here]
        selector.unregister(here)
        assert len(selector.get_map()) == 0


def test_it_polls_only_while_a_waiter_awaits_and_no_other_thread_works() -> None:
    here, there = socket.socketpair()
    inner = Counting()
    with here, there, PollingSelector(inner) as selector:
        selector.register(here, selectors.EVENT_READ)
        selector.select(0.001)
        assert inner.polls == 0  # no waiter: a plain sleep

        waiter = Due(0.005)
        selector.waiters.add(waiter)
        selector.select(0.02)
        assert inner.polls > 1  # polled until its 5 ms were up, then slept

        inner.polls = 0
        waiter.due = False
        selector.select(0.001)
        assert inner.polls == 0  # nothing due

        waiter.due = True
        selector.quiet_until = time.monotonic() + 60  # what threads_at_work sets
        selector.select(0.001)
        assert inner.polls == 0

        selector.quiet_until = 0.0
        del waiter  # held weakly: a waiter that is gone is forgotten
        selector.select(0.001)
        assert inner.polls == 0 and len(selector.waiters) == 0


def test_it_wraps_the_selector_of_asyncios_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        original = loop._selector
        waiter = Due(0.001)
        poll_while(loop, waiter)
        selector = loop._selector
        assert isinstance(selector, PollingSelector) and selector.inner is original
        poll_while(loop, Due(0.0))  # a waiter that never polls is not registered
        assert list(selector.waiters) == [waiter]
        threads_at_work(loop)
        assert selector.quiet_until > time.monotonic()

        # The loop runs on it as before: I/O, timers and calls from other threads.
        here, there = socket.socketpair()
        with here, there:
            got: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(here.fileno(), lambda: got.set_result(here.recv(1)))
            threading.Timer(0.01, there.send, (b"x",)).start()
            assert loop.run_until_complete(asyncio.wait_for(got, 5)) == b"x"
            loop.remove_reader(here.fileno())
        later = loop.call_later(0.01, lambda: None)
        loop.run_until_complete(asyncio.sleep(0.02))
        assert later.when() <= loop.time()
    finally:
        loop.close()
    assert original.get_map() is None  # closed through the wrapper


def test_new_loop_polls_always_when_asked() -> None:
    loop = new_loop(0.001)
    try:
        selector = loop._selector
        assert isinstance(selector, PollingSelector) and selector.poll_s == 0.001
    finally:
        loop.close()
    plain = new_loop()
    try:
        assert not isinstance(plain._selector, PollingSelector)
    finally:
        plain.close()


@embserve.deployment
async def echo(x: Any) -> Any:
    """What the caller's loop awaits from another process."""
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("poll_s", [0.0, 100e-6])
def test_a_process_replicas_caller_loop_polls_as_its_backend_says(poll_s: float) -> None:
    async def main() -> bool:
        async with embserve.Runtime(backend=ProcessBackend(busy_poll_s=poll_s)) as rt:
            handle = await rt.run_async(echo.bind())
            assert [await handle.remote(i) for i in range(20)] == list(range(20))
            selector = asyncio.get_running_loop()._selector
            return isinstance(selector, PollingSelector) and len(selector.waiters) == 1

    assert asyncio.run(main()) is (poll_s > 0)


@pytest.mark.timeout(60)
def test_a_runtime_of_its_own_thread_keeps_asyncios_loop_for_the_process_backend() -> None:
    # uvloop has no selector to poll; the in-thread backend, which never polls, gets it.
    pytest.importorskip("uvloop")
    with embserve.Runtime(backend=ProcessBackend()) as rt:
        handle = rt.run(echo.bind())
        assert handle.remote(3).result() == 3
        assert isinstance(rt.loop, asyncio.BaseEventLoop)

        async def on_the_loop() -> tuple[int, bool]:  # its loop awaits the answer: it polls
            answer = await handle.remote(4)
            selector = asyncio.get_running_loop()._selector
            return answer, isinstance(selector, PollingSelector)

        future = asyncio.run_coroutine_threadsafe(on_the_loop(), rt.loop)
        assert future.result(timeout=30) == (4, True)
    with embserve.Runtime() as local:
        assert "uvloop" in type(local.loop).__module__
