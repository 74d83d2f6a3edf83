"""The Dask comm transport: what it puts on a comm, and when it writes.

The protocol's whole contract suite runs on this transport too (``tests/remote``, over an
``inproc://`` and a ``tcp://`` comm pair); what is checked here is its own: a message alone is
written at once, messages sent together go out as one comm message, arrays travel as frames of
their own, never copied on the way out, and arrive at an aligned address.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import embserve.backends
from embserve.spi import Frame, decode, encode
from embserve_dask import DaskBackend
from embserve_dask._transport import CommTransport, _own
from tests.remote.parts import comm_pair, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


class _Ends:
    """Both ends of a comm pair as transports, what the first writes on its comm, and what the
    second receives."""

    def __init__(self, here: Any, there: Any) -> None:
        self.writes: list[list[Any]] = []
        write = here.write

        async def recording(message: Any, *args: Any, **kwargs: Any) -> Any:
            self.writes.append(message)
            return await write(message, *args, **kwargs)

        here.write = recording
        self.sender = CommTransport(here)
        self.receiver = CommTransport(there)
        self.received: list[tuple[int, int, list[Frame]]] = []
        self.closed: list[str] = []
        self.sender.start(lambda *message: None, self.closed.append)
        self.receiver.start(lambda *message: self.received.append(message), self.closed.append)


@pytest.fixture(params=["inproc://", "tcp://127.0.0.1:0"])
async def ends(request: pytest.FixtureRequest) -> AsyncIterator[_Ends]:
    """A transport pair over a fresh comm pair."""
    here, there = await comm_pair(request.param)
    pair = _Ends(here, there)
    # A loop's first write makes the runner task that starts the later ones at once.
    pair.sender.send(0, 0)
    await eventually(lambda: pair.received)
    await asyncio.sleep(0)
    pair.writes.clear()
    pair.received.clear()
    yield pair
    pair.sender.close()
    pair.receiver.close()


async def test_a_message_alone_is_written_at_once(ends: _Ends) -> None:
    ends.sender.send(3, 1, encode("alone"))
    assert len(ends.writes) == 1  # inside send: no turn of the loop, no task
    await eventually(lambda: ends.received)
    kind, ident, frames = ends.received[0]
    assert (kind, ident, decode(frames)) == (3, 1, "alone")


async def test_messages_sent_together_go_out_as_one_comm_message(ends: _Ends) -> None:
    ends.sender.send(3, 0, encode(0))
    for ident in range(1, 65):
        ends.sender.send(3, ident, encode(ident))
    assert len(ends.writes) == 1  # the first alone; the others wait for the next turn
    await eventually(lambda: len(ends.received) == 65)
    assert len(ends.writes) == 2
    assert [decode(frames) for _, _, frames in ends.received] == list(range(65))  # in order
    # And once the loop moved on, a message alone is written at once again.
    await asyncio.sleep(0)
    ends.sender.send(4, 99)
    assert len(ends.writes) == 3
    await eventually(lambda: len(ends.received) == 66)
    assert ends.received[-1] == (4, 99, [])


async def test_arrays_travel_as_frames_of_their_own_without_a_copy(ends: _Ends) -> None:
    array = np.arange(1_000_000, dtype=np.float64)
    frames = encode({"a": array})
    ends.sender.send(10, 5, frames)
    (written,) = ends.writes
    assert written[:2] == [10, 5]
    payload = written[2]
    head, buffer = payload.frames  # a Serialized: distributed writes its frames as they are
    assert len(head) < 1000 and np.shares_memory(np.frombuffer(buffer, np.float64), array)
    await eventually(lambda: ends.received)
    _, _, arrived = ends.received[0]
    value = decode(arrived)["a"]
    np.testing.assert_array_equal(value, array)
    assert value.flags.writeable and not np.shares_memory(value, array)


async def test_arrays_arrive_aligned_whatever_offset_their_frame_had(ends: _Ends) -> None:
    # distributed hands out a message's frames at whatever offset of its read buffer they fall
    # on; an array over an odd address is one numpy cannot hand to BLAS (30x slower here).
    matrix = np.ones((256, 256), dtype=np.float32)
    for odd in (1, 7, 13):
        ends.sender.send(10, odd, encode(({"pad": b"x" * odd * 20_000}, matrix)))
    await eventually(lambda: len(ends.received) == 3)
    for _, _, arrived in ends.received:
        _, value = decode(arrived)
        assert value.ctypes.data % 64 == 0 and value.flags.aligned and value.flags.writeable
        np.testing.assert_array_equal(value, matrix)


def test_own_copies_only_what_is_read_only_or_not_aligned() -> None:
    store = bytearray(4096 + 64)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(store)) % 64
    aligned = memoryview(store)[start : start + 4096]
    assert _own(aligned, copy=False) is aligned
    for frame in (memoryview(store)[start + 3 : start + 3 + 4096], bytes(4096), aligned):
        owned = _own(frame, copy=frame is aligned)
        view = memoryview(owned)
        assert owned is not frame and not view.readonly and view.tobytes() == bytes(frame)
        assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % 64 == 0
    assert _own(b"", copy=False) == bytearray()
    strided = memoryview(bytes(range(64))).cast("B", (8, 8))[::2]  # not contiguous
    assert memoryview(_own(strided, copy=False)).tobytes() == strided.tobytes()


async def test_a_write_that_waits_keeps_the_order_of_what_is_sent_after_it(ends: _Ends) -> None:
    # distributed serializes a message over 10 MiB in a thread: the write waits for it.
    array = np.ones(3_000_000, dtype=np.float64)  # 24 MB
    ends.sender.send(10, 1, encode(array))
    if ends.sender.comm.peer_address.startswith("tcp://"):
        assert ends.sender._writing  # still under way (an in-process comm does not serialize)
    for ident in range(2, 10):
        ends.sender.send(10, ident, encode(ident))
    await eventually(lambda: len(ends.received) == 9)
    assert [ident for _, ident, _ in ends.received] == list(range(1, 10))
    np.testing.assert_array_equal(decode(ends.received[0][2]), array)
    assert len(ends.writes) == 2  # the large one, then what waited behind it, together


async def test_the_end_of_the_comm_is_reported_once_and_later_sends_do_nothing(
    ends: _Ends,
) -> None:
    ends.sender.close()
    await eventually(lambda: ends.closed)
    assert ends.receiver.closed and len(ends.closed) == 1  # not to the end that closed
    ends.receiver.send(3, 1, encode("lost"))
    ends.sender.send(3, 1, encode("lost"))
    assert len(ends.writes) == 0
    for _ in range(10):
        await asyncio.sleep(0)
    assert ends.closed == [ends.closed[0]]


def test_the_backend_is_found_through_its_entry_points() -> None:
    assert embserve.backends.load_backend("dask") is DaskBackend
    assert embserve.backends.load_backend("tls") is DaskBackend
    assert embserve.backends.DaskBackend is DaskBackend
