"""Calls handed to a loop from other threads: one wake per burst, in order, each in its own
context; and futures settled in other threads reaching a loop the same way."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embserve._loop import call_soon_threadsafe, running_loop, start_from_loop, wrap_future
from embserve.response import Response

who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class CountingLoop(asyncio.SelectorEventLoop):
    """A real selector loop that counts how often other threads woke it."""

    wakes = 0

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, **kw: Any
    ) -> asyncio.Handle:
        self.wakes += 1
        return super().call_soon_threadsafe(callback, *args, **kw)


@pytest.fixture
def loop() -> Iterator[CountingLoop]:
    loop = CountingLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def block(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """Keep ``loop`` busy in a callback until the returned event is set."""
    gate, busy = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        gate.wait(10)

    loop.call_soon_threadsafe(hold)
    assert busy.wait(10)
    return gate


def test_a_burst_of_calls_wakes_the_loop_once_and_runs_them_in_order(loop: CountingLoop) -> None:
    gate = block(loop)
    before = loop.wakes
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def record(i: int) -> Callable[[], None]:
        return lambda: seen.append((i, who.get()))

    for i in range(100):
        who.set(f"caller-{i}")
        call_soon_threadsafe(loop, record(i))
    call_soon_threadsafe(loop, done.set)
    gate.set()
    assert done.wait(10)
    assert loop.wakes - before == 1
    # Each call ran in the context it was handed over in, as call_soon_threadsafe would.
    assert seen == [(i, f"caller-{i}") for i in range(100)]


def test_calls_after_a_drain_wake_the_loop_again(loop: CountingLoop) -> None:
    for _ in range(3):
        done = threading.Event()
        call_soon_threadsafe(loop, done.set)
        assert done.wait(10)  # nothing is left waiting for a wake that never comes


def test_a_failing_call_goes_to_the_exception_handler_and_the_others_run(
    loop: CountingLoop,
) -> None:
    errors: list[BaseException] = []
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
    gate = block(loop)
    done = threading.Event()

    def fail() -> None:
        raise KeyError("boom")

    call_soon_threadsafe(loop, fail)
    call_soon_threadsafe(loop, done.set)
    gate.set()
    assert done.wait(10)
    assert [type(e) for e in errors] == [KeyError]


def test_a_closed_loop_refuses_calls() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    with pytest.raises(RuntimeError):
        call_soon_threadsafe(closed, lambda: None)
    with pytest.raises(RuntimeError):  # still refused: no drain is thought to be on its way
        call_soon_threadsafe(closed, lambda: None)


def test_wrap_future_settles_many_futures_from_another_thread_with_one_wake() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sources = [concurrent.futures.Future[int]() for _ in range(50)]
        waiters = [wrap_future(f, loop) for f in sources]
        failing = concurrent.futures.Future[int]()
        failed = wrap_future(failing, loop)

        def settle() -> None:
            for i, source in enumerate(sources):
                source.set_result(i)
            failing.set_exception(ValueError("bad"))

        before = loop.wakes
        thread = threading.Thread(target=settle)
        thread.start()
        thread.join()  # the loop is held meanwhile: all 51 outcomes are one burst
        assert await asyncio.gather(*waiters) == list(range(50))
        with pytest.raises(ValueError, match="bad"):
            await failed
        assert loop.wakes - before == 1

        # Cancelling the waiter cancels the source; a source cancelled elsewhere cancels it.
        source = concurrent.futures.Future[int]()
        waiter = wrap_future(source, loop)
        waiter.cancel()
        await asyncio.sleep(0)
        assert source.cancelled()
        other = concurrent.futures.Future[int]()
        waiter = wrap_future(other, loop)
        threading.Thread(target=other.cancel).start()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    loop = CountingLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_start_from_loop_answers_fails_and_cancels_across_loops(loop: CountingLoop) -> None:
    async def main() -> None:
        here = asyncio.get_running_loop()

        def ready(value: int) -> Callable[[], asyncio.Future[int]]:
            def start() -> asyncio.Future[int]:
                assert asyncio.get_running_loop() is loop
                future: asyncio.Future[int] = loop.create_future()
                future.set_result(value)
                return future

            return start

        assert await asyncio.gather(
            *(start_from_loop(loop, here, ready(i)) for i in range(50))
        ) == list(range(50))

        def broken() -> asyncio.Future[int]:
            raise ValueError("no start")

        with pytest.raises(ValueError, match="no start"):
            await start_from_loop(loop, here, broken)

        # Cancelled once started: the source on the other loop is cancelled too.
        sources: list[asyncio.Future[int]] = []
        started = threading.Event()

        def pending() -> asyncio.Future[int]:
            sources.append(loop.create_future())
            started.set()
            return sources[0]

        waiter = start_from_loop(loop, here, pending)
        assert await asyncio.to_thread(started.wait, 10)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        deadline = here.time() + 10
        while not sources[0].cancelled():
            assert here.time() < deadline
            await asyncio.sleep(0.001)

        # Cancelled before the other loop got to it: discard runs instead of start.
        gate = block(loop)
        discarded = threading.Event()
        waiter = start_from_loop(loop, here, ready(1), discard=discarded.set)
        waiter.cancel()
        gate.set()
        assert await asyncio.to_thread(discarded.wait, 10)

    asyncio.run(main())


def test_answers_handed_over_in_one_turn_of_a_loop_wake_the_other_once(loop: CountingLoop) -> None:
    async def main() -> None:
        before = loop.wakes
        done = [threading.Event() for _ in range(50)]
        for event in done:  # all in this one turn: the wake waits for its end
            call_soon_threadsafe(loop, event.set, copy_context=False, defer=True)
        assert loop.wakes == before  # not yet
        await asyncio.sleep(0)
        assert await asyncio.to_thread(lambda: all(e.wait(10) for e in done))
        assert loop.wakes - before == 1

    asyncio.run(main())


def test_running_loop_is_the_loop_running_in_this_thread_and_none_elsewhere() -> None:
    assert running_loop() is None
    seen: list[object] = []

    async def look() -> None:
        seen.append(running_loop())
        seen.append(running_loop())  # the remembered one, still right
        seen.append(await asyncio.to_thread(running_loop))  # another thread runs none

    first = asyncio.new_event_loop()
    first.run_until_complete(look())
    assert seen == [first, first, None]
    assert running_loop() is None  # it stopped: not remembered past its end
    second = asyncio.new_event_loop()
    second.run_until_complete(look())  # a new loop in the same thread is found
    assert seen[3:] == [second, second, None]
    first.close()
    second.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_running_loop_is_none_in_a_child_forked_from_a_running_loop() -> None:
    async def fork() -> int:
        assert running_loop() is asyncio.get_running_loop()  # remembered before the fork
        pid = os.fork()
        if pid == 0:  # the child: its copy of the loop does not run there
            os._exit(0 if running_loop() is None else 1)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        return status

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads around
        assert asyncio.run(fork()) == 0


def test_calls_from_another_loop_go_over_and_come_back_in_one_wake_per_burst(
    loop: CountingLoop,
) -> None:
    def ready(value: int) -> Callable[[], asyncio.Future[int]]:
        def start() -> asyncio.Future[int]:
            future: asyncio.Future[int] = loop.create_future()
            future.set_result(value)
            return future

        return start

    async def main() -> None:
        here = asyncio.get_running_loop()
        assert isinstance(here, CountingLoop)
        gate = block(loop)  # so that all 50 are there when it looks
        wakes = loop.wakes, here.wakes
        waiters = [start_from_loop(loop, here, ready(i)) for i in range(50)]
        gate.set()
        assert await asyncio.gather(*waiters) == list(range(50))
        assert (loop.wakes - wakes[0], here.wakes - wakes[1]) == (1, 1)

    here = CountingLoop()
    try:
        here.run_until_complete(main())
    finally:
        here.close()


def test_running_loop_remembers_nothing_once_asyncio_allows_nested_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # nest_asyncio marks asyncio so; then a loop may run inside another in one thread, and
    # the one running is asyncio's answer, not the one this thread found first.
    outer = asyncio.new_event_loop()
    inner = asyncio.new_event_loop()

    async def look() -> tuple[object, object]:
        first = running_loop()  # remembered
        monkeypatch.setattr(asyncio, "_nest_patched", True, raising=False)
        # What a nested run looks like to asyncio: the inner loop is the running one.
        asyncio.events._set_running_loop(inner)
        inner._thread_id = threading.get_ident()
        try:
            return first, running_loop()
        finally:
            inner._thread_id = None
            asyncio.events._set_running_loop(outer)

    assert outer.run_until_complete(look()) == (outer, inner)
    outer.close()
    inner.close()


def test_a_response_is_bridged_to_a_loop_nested_in_the_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Response.__await__ takes its loop's thread id as telling that its loop runs the awaiting
    # code; not once nest_asyncio marked asyncio, where a loop may run inside it: there it is
    # bridged as from any other loop (the future's own iterator would fail the awaiting task).
    outer = asyncio.new_event_loop()
    inner = asyncio.new_event_loop()
    future = outer.create_future()
    response = Response(future, outer)

    async def wait() -> Any:
        return await response

    async def start() -> asyncio.Task[Any]:
        monkeypatch.setattr(asyncio, "_nest_patched", True, raising=False)
        outer._thread_id = threading.get_ident()
        try:
            task = asyncio.ensure_future(wait())
            await asyncio.sleep(0)  # the task awaits the response now
        finally:
            outer._thread_id = None
        return task

    task = inner.run_until_complete(start())
    assert not task.done()
    future.set_result(7)
    outer.run_until_complete(asyncio.sleep(0))  # the bridge's link runs on ``outer``
    assert inner.run_until_complete(task) == 7
    outer.close()
    inner.close()
