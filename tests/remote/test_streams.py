"""Streams over the protocol: every item, within the credit window, closed early."""

from __future__ import annotations

import asyncio

import pytest

from embserve._remote import STREAM_WINDOW
from tests.remote.parts import (
    Connect,
    call,
    eventually,
    state,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_streams_yield_every_item(connect: Connect) -> None:
    async with connect() as ends:
        items = [i async for i in ends.replica.stream(call("count_sync", 5))]
        assert items == [0, 1, 2, 3, 4]
        many = [i async for i in ends.replica.stream(call("count", 1000))]
        assert many == list(range(1000))  # far longer than the window: grants keep it going
        with pytest.raises(TypeError, match="not a generator"):
            async for _ in ends.replica.stream(call("add", 1, 2)):
                pass


async def test_a_fast_generator_stays_within_the_window_of_a_slow_reader(
    connect: Connect,
) -> None:
    async with connect() as ends:
        stream = ends.replica.stream(call("count", 1000))
        items = []
        async for item in stream:
            items.append(item)
            state.taken = len(items)
            if len(items) == 1:
                # The generator runs ahead by the window, and no further, however long we wait.
                await eventually(lambda: state.produced >= STREAM_WINDOW)
                for _ in range(200):  # chances to overrun, were the window not kept
                    await asyncio.sleep(0)
                assert state.produced <= STREAM_WINDOW + 1
            elif len(items) % 7 == 0:
                for _ in range(5):
                    await asyncio.sleep(0)
        assert items == list(range(1000))
        # An item is produced before the generator waits for credit to send it: one more.
        assert state.most_ahead <= STREAM_WINDOW + 1


async def test_closing_a_stream_early_closes_the_generator(connect: Connect) -> None:
    async with connect() as ends:
        stream = ends.replica.stream(call("count", 1_000_000))
        async for item in stream:
            assert item == 0
            break
        await stream.aclose()
        await eventually(lambda: state.closed_streams == 1)
        assert state.produced < 1_000_000
        await eventually(lambda: not ends.replica._pending.held)  # type: ignore[union-attr]
