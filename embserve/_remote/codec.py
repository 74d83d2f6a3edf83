"""Values and exceptions as frames: pickle protocol 5 with out-of-band buffers.

A value becomes a pickle stream followed by its out-of-band buffers (a numpy array's memory is
one frame of its own, never copied into the pickle). Plain pickle is tried first, as it is
several times faster on small values; what it cannot pickle (lambdas, classes defined in
functions) goes through cloudpickle. An exception travels as its type name, message and
replica traceback beside the pickled exception, so that one the other side cannot rebuild still
arrives, as a :class:`~embserve.wire.RemoteError` with that type name and traceback.

Nothing here may be used on data that came from outside (HTTP): only on what embserve sent
between its own processes.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from embserve.errors import attach_traceback, format_traceback, remote_traceback
from embserve.wire import RemoteError

__all__ = [
    "ErrorPayload",
    "Frame",
    "decode",
    "decode_error",
    "encode",
    "encode_error",
    "error_payload",
    "load_error",
]

#: One frame of a message: the pickle stream (first) or one out-of-band buffer.
Frame = bytes | bytearray | memoryview
#: An exception as (type name, message, traceback text, pickled exception or None).
ErrorPayload = tuple[str, str, str, "bytes | None"]


def encode(value: Any, *, by_value: bool = False) -> list[Frame]:
    """``value`` as a pickle stream and its out-of-band buffers.

    ``by_value`` forces cloudpickle, for user code the other side may not be able to import.
    Raises what pickling raises.
    """
    buffers: list[pickle.PickleBuffer] = []
    if not by_value:
        try:
            head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        except Exception:
            buffers.clear()
        else:
            if not buffers:
                return [head]
            return [head, *(b.raw() for b in buffers)]
    import cloudpickle

    head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return [head, *(b.raw() for b in buffers)]


def decode(frames: Sequence[Frame]) -> Any:
    """The value :func:`encode` turned into ``frames`` (None for no frames)."""
    if not frames:
        return None
    return pickle.loads(frames[0], buffers=frames[1:])


def error_payload(exc: BaseException) -> ErrorPayload:
    """``exc`` as (type name, message, traceback text, pickled exception or None).

    The exception is pickled apart from the rest, so that one that cannot be pickled, or not
    rebuilt on the other side, still arrives with its type name, message and traceback.
    """
    text = remote_traceback(exc) or format_traceback(exc)
    try:
        import cloudpickle

        blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        blob = None
    return type(exc).__qualname__, str(exc), text, blob


def load_error(payload: ErrorPayload) -> BaseException:
    """The exception of :func:`error_payload`, its replica traceback attached as a note."""
    type_name, message, text, blob = payload
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob is not None else RemoteError(type_name, message)
    except Exception:  # its class is not importable here, or its __init__ wants other args
        exc = RemoteError(type_name, message)
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message)
    attach_traceback(exc, text, note=True)
    return exc


def encode_error(exc: BaseException) -> list[Frame]:
    """:func:`error_payload` of ``exc``, encoded."""
    return encode(error_payload(exc))


def decode_error(frames: Sequence[Frame]) -> BaseException:
    """The exception :func:`encode_error` turned into ``frames``."""
    return load_error(decode(frames))
