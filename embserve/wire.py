"""How values cross a process boundary: pickle protocol 5 with out-of-band buffers.

Shared by every backend whose replicas live in another process, so that requests, results and
exceptions look the same whichever carries them. Large buffers (numpy arrays, bytes-likes that
support it) travel as separate frames and are never copied into the pickle stream. User code
(deployments, arguments that are closures) is pickled with cloudpickle. Nothing here may be used
on data that came over HTTP: only on what embserve itself sent between its own processes.
"""

from __future__ import annotations

import pickle
from typing import Any

from embserve.errors import EmbserveError, attach_traceback, format_traceback, remote_traceback

__all__ = ["RemoteError", "dumps", "dumps_exception", "loads", "loads_exception"]

Frames = list[bytes | memoryview | pickle.PickleBuffer]


def dumps(value: Any) -> Frames:
    """``value`` as frames: the pickle stream first, then its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    import cloudpickle

    head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return [head, *buffers]


def loads(frames: list[Any]) -> Any:
    """The value :func:`dumps` turned into ``frames``."""
    return pickle.loads(frames[0], buffers=frames[1:])


class RemoteError(EmbserveError):
    """A user exception that could not be pickled, re-raised with its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


def dumps_exception(exc: BaseException) -> Frames:
    """An exception with its traceback text, falling back to :class:`RemoteError` if need be."""
    text = remote_traceback(exc) or format_traceback(exc)
    try:
        return dumps((exc, text))
    except Exception:
        return dumps((RemoteError(type(exc).__qualname__, str(exc)), text))


def loads_exception(frames: list[Any]) -> BaseException:
    """The exception of :func:`dumps_exception`, its replica traceback attached as a note."""
    exc, text = loads(frames)
    attach_traceback(exc, text, note=True)
    assert isinstance(exc, BaseException)
    return exc
