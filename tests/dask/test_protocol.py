"""The messages of the Dask backend: inline small values, out-of-band buffers, exceptions."""

from __future__ import annotations

import numpy as np
import pytest

import embserve.backends
from embserve.errors import remote_traceback
from embserve_dask import DaskBackend
from embserve_dask._protocol import pack, pack_exception, unpack, unpack_exception


def test_small_values_travel_inline() -> None:
    fields = pack({"x": [1, 2.5, "three"]})
    assert set(fields) == {"b"} and isinstance(fields["b"], bytes)
    assert unpack(fields) == {"x": [1, 2.5, "three"]}


def test_arrays_travel_as_frames_of_their_own_without_a_copy() -> None:
    array = np.arange(100_000, dtype=np.float64)
    fields = pack({"a": array})
    payload = fields["s"]
    head, *buffers = payload.frames
    assert len(head) < 1000  # the array is not inside the pickle stream
    assert any(np.shares_memory(np.frombuffer(b, dtype=np.float64), array) for b in buffers)
    np.testing.assert_array_equal(unpack(fields)["a"], array)


def _raise() -> None:
    raise LookupError("the key is missing")


def test_exceptions_keep_their_type_and_the_replica_traceback() -> None:
    with pytest.raises(LookupError) as info:
        _raise()
    restored = unpack_exception(pack_exception(info.value))
    assert type(restored) is LookupError and str(restored) == "the key is missing"
    assert "_raise" in (remote_traceback(restored) or "")


def test_the_backend_is_found_through_its_entry_points() -> None:
    assert embserve.backends.load_backend("dask") is DaskBackend
    assert embserve.backends.load_backend("tls") is DaskBackend
    assert embserve.backends.DaskBackend is DaskBackend
