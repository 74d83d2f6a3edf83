"""Values and exceptions as frames: pickle protocol 5 with out-of-band buffers.

A value becomes a pickle stream followed by its out-of-band buffers (a large numpy array's
memory is one frame of its own, never copied into the pickle; a small one is copied in). Plain
pickle is tried first, as it is several times faster on small values; what it cannot pickle
(lambdas, classes defined in functions) goes through cloudpickle. User code sent to start a
replica (:func:`encode_code`) goes by reference wherever the other side can import it, and by
value only where it cannot.
An exception travels as its type name, message and replica traceback beside the pickled
exception, so that one the other side cannot rebuild still arrives, as a
:class:`~embserve.wire.RemoteError` with that type name and traceback.

Nothing here may be used on data that came from outside (HTTP): only on what embserve sent
between its own processes.
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from embserve.errors import attach_traceback, format_traceback, remote_traceback
from embserve.wire import RemoteError

__all__ = [
    "ErrorPayload",
    "Frame",
    "decode",
    "decode_error",
    "encode",
    "encode_code",
    "encode_error",
    "error_payload",
    "find_unpicklable",
    "load_error",
]

#: One frame of a message: the pickle stream (first) or one out-of-band buffer.
Frame = bytes | bytearray | memoryview
#: An exception as (type name, message, traceback text, pickled exception or None).
ErrorPayload = tuple[str, str, str, "bytes | None"]


#: Buffers up to this size go inside the pickle stream: copying a small array costs less than
#: the frame of its own it would otherwise travel in.
IN_BAND_MAX = 16 * 1024


class _Buffers(list[pickle.PickleBuffer]):
    # The out-of-band buffers of one value; as pickle's buffer_callback, it keeps the large ones
    # and returns True (in-band) for the small.

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        with memoryview(buffer) as view:
            small = view.nbytes <= IN_BAND_MAX
        if not small:
            self.append(buffer)
        return small


def encode(value: Any, *, by_value: bool = False) -> list[Frame]:
    """``value`` as a pickle stream and its out-of-band buffers (those over
    :data:`IN_BAND_MAX` bytes; smaller ones are copied into the stream).

    ``by_value`` forces cloudpickle, for user code the other side may not be able to import.
    Raises what pickling raises.
    """
    buffers = _Buffers()
    if not by_value:
        try:
            head = pickle.dumps(value, protocol=5, buffer_callback=buffers)
        except Exception:
            buffers.clear()
        else:
            if not buffers:
                return [head]
            return [head, *(b.raw() for b in buffers)]
    import cloudpickle

    head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers)
    return [head, *(b.raw() for b in buffers)]


def encode_code(value: Any) -> list[Frame]:
    """``value`` (user code and what it holds) as frames, for a process that can import what
    this one imports (given the same ``sys.path``).

    Functions and classes go by reference (their module and name: the other side imports them)
    wherever that name finds them again, as plain pickle does them; a class or function that
    ``@embserve.deployment`` replaced in its module by the :class:`~embserve.Deployment` it made
    is found through that Deployment. Only what no name finds travels by value (cloudpickle):
    what lives in ``__main__`` (a script, a notebook), in a function's locals, or in a module
    registered with ``cloudpickle.register_pickle_by_value``. So a deployment from an
    importable module never drags its module's globals (locks, apps, clients) along.
    Raises what pickling raises.
    """
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _code_pickler()(stream, protocol=5, buffer_callback=buffers.append).dump(value)
    return [stream.getvalue(), *(b.raw() for b in buffers)]


@functools.cache  # made on first use: cloudpickle loads only with the first replica sent
def _code_pickler() -> type[pickle.Pickler]:
    import cloudpickle

    by_value = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value", None)

    class CodePickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, (type, types.FunctionType)):
                name = _wrapped_name(obj, by_value)
                if name is not None:
                    return _find_wrapped, name
            return super().reducer_override(obj)

    return CodePickler


def _wrapped_name(obj: Any, by_value: Any) -> tuple[str, str] | None:
    # Only what cloudpickle would otherwise send by value although its module is importable:
    # a target that its module's name now holds wrapped (``.target``) by a Deployment.
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str):
        return None
    if module_name == "__main__" or "<locals>" in qualname:
        return None
    module = sys.modules.get(module_name)
    if module is None or (by_value is not None and by_value(module)):
        return None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is obj or getattr(found, "target", None) is not obj:
        return None  # cloudpickle finds it by name itself, or nothing names it
    return module_name, qualname


def _find_wrapped(module_name: str, qualname: str) -> Any:
    """The target of what ``module_name.qualname`` names (the unpickling side of
    :func:`encode_code`'s references to wrapped targets)."""
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return getattr(found, "target", found)


def find_unpicklable(parts: Iterable[tuple[str, Any]]) -> tuple[str, Any, Exception] | None:
    """Which piece of user code :func:`encode_code` cannot send: (what it is, the object, the
    error), looking into each of ``parts`` (a description and an object) that fails as a whole:
    a class's attributes, a function's globals and closure, recursively. None when every
    part pickles."""
    seen: set[int] = set()
    for description, value in parts:
        found = _unpicklable(description, value, seen, depth=0)
        if found is not None:
            return found
    return None


def _unpicklable(
    description: str, value: Any, seen: set[int], depth: int
) -> tuple[str, Any, Exception] | None:
    if id(value) in seen:
        return None
    seen.add(id(value))
    try:
        encode_code(value)
    except Exception as exc:
        error = exc
    else:
        return None
    if depth < 4:
        for inner_description, inner in _pieces(value):
            found = _unpicklable(inner_description, inner, seen, depth + 1)
            if found is not None:
                return found
    return description, value, error


def _pieces(value: Any) -> Iterator[tuple[str, Any]]:
    # What cloudpickle sends with a class or function it sends by value.
    if isinstance(value, type):
        for name, member in vars(value).items():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                accessors = (member.fget, member.fset)
                yield from ((f"{value.__qualname__}.{name}", f) for f in accessors if f)
            elif isinstance(member, types.FunctionType):
                yield f"{value.__qualname__}.{name}", member
            elif not (name.startswith("__") and name.endswith("__")):
                yield f"the class attribute {value.__qualname__}.{name}", member
    elif isinstance(value, types.FunctionType):
        names = _global_names(value.__code__)
        for name in sorted(names):
            if name in value.__globals__:
                global_value = value.__globals__[name]
                yield f"the global {name!r} that {value.__qualname__} uses", global_value
        cells = value.__closure__ or ()
        for name, cell in zip(value.__code__.co_freevars, cells, strict=False):
            try:
                contents = cell.cell_contents
            except ValueError:  # not set yet
                continue
            yield f"the variable {name!r} that {value.__qualname__} closes over", contents


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


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
