"""start_task: a call's first step runs at once, inside a reused runner task.

Each property a task gives the code in it is checked here, on every Python: current_task,
asyncio.timeout, contextvars, cancellation before and after the first wait, results and errors;
and that a runner whose call was cancelled is not reused.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref
from typing import Any

import anyio
import pytest

from embserve._loop import start_task

pytestmark = pytest.mark.anyio

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="outside")


async def warm(count: int = 1) -> None:
    """Leave ``count`` runners idle on this loop (the first calls on a loop make them)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()

    async def hold() -> None:
        await gate.wait()

    held = [start_task(loop, hold()) for _ in range(count)]
    gate.set()
    await asyncio.gather(*held)
    await asyncio.sleep(0)  # the runners made meanwhile park


async def test_with_no_runner_idle_a_call_gets_a_task_of_its_own() -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()

    async def waits(n: int) -> int:
        await gate.wait()
        return n

    await warm(1)
    first, second = start_task(loop, waits(1)), start_task(loop, waits(2))
    assert isinstance(second, asyncio.Task)  # the one idle runner took the first
    gate.set()
    assert list(await asyncio.gather(first, second)) == [1, 2]


async def test_a_call_that_never_waits_is_over_before_start_task_returns() -> None:
    ran: list[str] = []

    async def quick() -> int:
        ran.append("body")
        return 7

    await warm()
    task = start_task(asyncio.get_running_loop(), quick())
    assert ran == ["body"]
    assert task.done()
    assert await task == 7


async def test_the_first_step_sends_before_returning_and_the_task_finishes_the_rest() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    steps: list[str] = []

    async def two_steps() -> int:
        steps.append("first")
        value = await gate
        steps.append("second")
        return value + 1

    await warm()
    task = start_task(loop, two_steps())
    assert steps == ["first"]
    gate.set_result(41)
    assert await task == 42
    assert steps == ["first", "second"]


async def test_code_in_the_first_step_is_in_the_task_that_goes_on_with_it() -> None:
    seen: list[Any] = []

    async def who() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    await warm()
    outer = asyncio.current_task()
    future = start_task(asyncio.get_running_loop(), who())
    assert asyncio.current_task() is outer  # the caller's task is restored
    await future
    assert seen[0] is seen[1] is not None and seen[0] is not outer


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
async def test_asyncio_timeout_works_from_the_first_step() -> None:
    async def slow() -> str:
        try:
            async with asyncio.timeout(0.01):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.Event().wait()
        except TimeoutError:
            return "timed out"
        return "not reached"

    await warm()
    loop = asyncio.get_running_loop()
    assert await start_task(loop, slow()) == "timed out"
    # The runner's task is clean again: a timeout in the next call on it works as well.
    assert await start_task(loop, slow()) == "timed out"


async def test_each_call_has_a_context_of_its_own() -> None:
    async def set_it(value: str) -> str:
        before = where.get()
        where.set(value)
        await asyncio.sleep(0)
        return f"{before}->{where.get()}"

    await warm()
    loop = asyncio.get_running_loop()
    assert await start_task(loop, set_it("a")) == "outside->a"
    assert await start_task(loop, set_it("b")) == "outside->b"  # nothing left from the first
    assert where.get() == "outside"


@pytest.mark.parametrize("waits_first", [False, True])
async def test_an_error_is_the_calls_outcome(waits_first: bool) -> None:
    async def fails() -> None:
        if waits_first:
            await asyncio.sleep(0)
        raise KeyError("no such key")

    await warm()
    future = start_task(asyncio.get_running_loop(), fails())
    with pytest.raises(KeyError, match="no such key"):
        await future


async def test_cancelled_before_the_runner_went_on_cancels_what_the_first_step_awaits() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    outcome: list[str] = []

    async def waits() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            outcome.append("cancelled at its await")
            raise

    await warm()
    future = start_task(loop, waits())
    assert future.cancel()  # before the loop ran the runner even once
    with pytest.raises(asyncio.CancelledError):
        await future
    assert outcome == ["cancelled at its await"]
    assert gate.cancelled()


async def test_cancelled_while_waiting_later_on_and_the_runner_is_not_reused() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    closed: list[bool] = []
    tasks: list[Any] = []

    async def waits() -> None:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(0)
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            closed.append(True)

    async def who() -> Any:
        return asyncio.current_task()

    await warm()
    future = start_task(loop, waits())
    await started.wait()
    assert future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert closed == [True]
    await warm()
    assert await start_task(loop, who()) is not tasks[0]


async def test_a_call_that_ended_cannot_be_cancelled() -> None:
    async def quick() -> str:
        return "done"

    await warm()
    future = start_task(asyncio.get_running_loop(), quick())
    assert not future.cancel()
    assert await future == "done"


async def test_a_call_that_cancels_its_own_task_in_its_first_step() -> None:
    loop = asyncio.get_running_loop()

    async def cancels_itself() -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return "saw its cancellation"
        return "not reached"

    await warm()
    assert await start_task(loop, cancels_itself()) == "saw its cancellation"
    assert await start_task(loop, asyncio.sleep(0, "the next call runs")) == "the next call runs"


async def test_calls_started_from_the_first_step_of_another() -> None:
    loop = asyncio.get_running_loop()

    async def inner() -> Any:
        return asyncio.current_task()

    async def outer() -> tuple[Any, Any]:
        mine = asyncio.current_task()
        theirs = await start_task(loop, inner())
        return mine, theirs

    await warm(2)
    mine, theirs = await start_task(loop, outer())
    assert mine is not None and theirs is not None and mine is not theirs


async def test_anyio_scopes_and_task_groups_work_call_after_call_on_one_runner() -> None:
    loop = asyncio.get_running_loop()

    async def scoped() -> bool:
        with anyio.move_on_after(0.01) as scope:
            await asyncio.Event().wait()
        return scope.cancelled_caught

    async def grouped() -> list[int]:
        results: list[int] = []

        async def child(n: int) -> None:
            await asyncio.sleep(0)
            results.append(n)

        async with anyio.create_task_group() as group:
            for n in range(3):
                group.start_soon(child, n)
        return sorted(results)

    await warm()
    for _ in range(3):  # the same idle runner takes each call in turn
        assert await start_task(loop, scoped()) is True
        assert await start_task(loop, grouped()) == [0, 1, 2]


def test_a_closed_loop_and_its_runners_are_not_kept_alive() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def use_runners() -> None:
        loop = asyncio.get_running_loop()
        loops.append(weakref.ref(loop))
        await warm(2)
        assert await start_task(loop, asyncio.sleep(0, "ran")) == "ran"

    asyncio.run(use_runners())
    gc.collect()
    assert loops[0]() is None


async def test_the_private_asyncio_names_it_relies_on_behave_as_it_expects() -> None:
    """_loop.py is the one module using asyncio's private names; each is checked here, so a
    Python release that changes one fails this test rather than a call in production."""
    from asyncio.tasks import _enter_task, _leave_task

    from embserve._loop import running_loop

    loop = asyncio.get_running_loop()
    assert running_loop() is loop
    assert await asyncio.to_thread(running_loop) is None  # no loop in that thread
    task = asyncio.current_task()
    assert task is not None
    _leave_task(loop, task)
    other = loop.create_task(asyncio.sleep(0))
    _enter_task(loop, other)
    assert asyncio.current_task() is other
    _leave_task(loop, other)
    _enter_task(loop, task)
    assert asyncio.current_task() is task
    await other
    future = loop.create_future()
    assert hasattr(future, "_asyncio_future_blocking")
    future.cancel()


async def test_current_task_is_asyncio_s() -> None:
    """_loop.current_task(loop) finds what asyncio.current_task() does: in a task, and in a
    call's first step inside a runner."""
    from embserve._loop import current_task

    loop = asyncio.get_running_loop()
    assert current_task(loop) is asyncio.current_task()

    async def seen() -> tuple[Any, Any]:
        return current_task(loop), asyncio.current_task()

    await warm()
    mine, theirs = await start_task(loop, seen())
    assert mine is theirs is not None
