"""What a deployment returns or raises, turned into an HTTP response.

Return values: ``dict`` and other mappings, ``list``, numbers, ``None``, numpy arrays and
dataclasses become JSON; ``str`` text; ``bytes`` an octet-stream; a Starlette ``Response`` goes
out as it is; generators are streamed (see :func:`is_stream`). What JSON cannot hold is mended
rather than failed on: ``NaN`` and infinities become ``null`` (as JavaScript's
``JSON.stringify`` does) and lone surrogates in strings become U+FFFD. Errors follow one table
(see :func:`error_response`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from embserve.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    EmbserveError,
    HTTPError,
    MethodNotAllowedError,
    ReplicaDiedError,
    RequestTimeoutError,
    remote_traceback,
)
from embserve_asgi.requests import BodyTimeout, BodyTooLarge

__all__ = [
    "Cancelled",
    "error_response",
    "is_stream",
    "json_bytes",
    "render",
    "send_plain",
    "to_response",
    "utf8",
]

logger = logging.getLogger("embserve.http")

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"
NDJSON = "application/x-ndjson"
JSON_BYTES, TEXT_BYTES, OCTETS_BYTES = JSON.encode(), TEXT.encode(), OCTETS.encode()


def _default(value: Any) -> Any:
    # numpy is imported by the user's code if their values hold arrays; never import it here.
    tolist = getattr(value, "tolist", None)
    if tolist is not None and type(value).__module__ == "numpy":
        return tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):  # Starlette's QueryParams and Headers, a MappingProxyType
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")


_encode = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=_default, allow_nan=False
).encode


def _fast_encoder() -> Callable[[Any], str]:
    # json's C encoder, made once: JSONEncoder.encode makes a new one for every value, which
    # costs more than encoding a small answer. Made without the table of containers being
    # encoded (shared, it would be wrong across threads), so a value that contains itself
    # ends in RecursionError, and json_bytes then asks the checking encoder what is wrong.
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:  # no C accelerator (PyPy): the plain encoder
        return _encode
    encode = make(None, _default, basestring, None, ":", ",", False, False, False)

    def fast(value: Any) -> str:
        if type(value) is str:  # the C encoder takes containers and numbers only
            return _encode(value)
        return "".join(encode(value, 0))

    return fast


_encode_fast = _fast_encoder()


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (numpy values and dataclasses included).

    ``NaN`` and infinities are sent as ``null``, lone surrogates as U+FFFD (see the module's
    docstring); other values JSON cannot hold raise ``TypeError``.
    """
    try:
        return _encode_fast(value).encode("utf-8")
    except ValueError:  # a non-finite float, or a lone surrogate (UnicodeEncodeError)
        pass
    except RecursionError:  # nested too deep, or a value that contains itself: which?
        _encode(value)  # raises ValueError("Circular reference detected") for the latter
        raise
    # The slow path, taken only by values that need mending.
    return utf8(_encode_finite(_finite(value, set())))


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, any lone surrogate in it replaced by U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Through UTF-16 a surrogate pair (two str characters) becomes the character it stands
        # for, and a lone surrogate the replacement character.
        mended = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return mended.encode("utf-8")


def _finite(value: Any, path: set[int]) -> Any:
    """``value`` with every non-finite float replaced by None (containers copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in path:
            raise ValueError("Circular reference detected")
        path.add(id(value))
        try:
            if isinstance(value, dict):
                return {_finite(k, path): _finite(v, path) for k, v in value.items()}
            return [_finite(item, path) for item in value]
        finally:
            path.discard(id(value))
    return value


def _default_finite(value: Any) -> Any:
    return _finite(_default(value), set())


_encode_finite = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=_default_finite, allow_nan=False
).encode


def is_stream(value: Any) -> bool:
    """Whether a returned value is a generator to stream rather than a value to send."""
    return inspect.isgenerator(value) or inspect.isasyncgen(value)


def render(value: Any) -> tuple[bytes, bytes]:
    """The body and content type of a plain return value (anything but a ``Response``)."""
    kind = type(value)
    if kind is dict or kind is list:
        return json_bytes(value), JSON_BYTES
    if kind is str:
        return utf8(value), TEXT_BYTES
    if kind is bytes or kind is bytearray or kind is memoryview:
        return bytes(value), OCTETS_BYTES
    return json_bytes(value), JSON_BYTES


def to_response(value: Any, request_id: str) -> Response:
    """The HTTP response for a non-streamed return value."""
    if isinstance(value, Response):
        value.headers.setdefault("x-request-id", request_id)
        return value
    body, media = render(value)
    return Response(body, media_type=media.decode("latin-1"), headers={"x-request-id": request_id})


async def send_plain(send: Send, value: Any, request_id: str) -> int:
    """Send a plain return value as a 200 response, as ASGI messages built directly."""
    body, media = render(value)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", media),
                (b"content-length", str(len(body)).encode("latin-1")),
                (b"x-request-id", request_id.encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return 200


def chunk_bytes(item: Any) -> bytes:
    """One streamed item as bytes: text as UTF-8, bytes as they are, anything else a JSON line."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return utf8(item)
    return json_bytes(item) + b"\n"


def stream_media_type(first: Any) -> str:
    """The content type of a stream, told by its first item."""
    if isinstance(first, bytes):
        return OCTETS
    if isinstance(first, str):
        return TEXT
    return NDJSON


def _error(status: int, message: str, request_id: str, **headers: str) -> Response:
    body = json_bytes({"error": message, "request_id": request_id})
    return Response(
        body, status_code=status, media_type=JSON, headers={"x-request-id": request_id, **headers}
    )


class Cancelled(Exception):
    """The server cancelled a request before it was answered (e.g. its graceful timeout ran out
    at shutdown): HTTP 503, and the connection closes."""

    def __init__(self) -> None:
        super().__init__("the request was cancelled before it was answered")


# What the client is told for each error embserve raises: the error's own message (None) where
# embserve builds it from its own values alone (counts, options, the deployment's name), else a
# fixed text. DeploymentUnavailableError, DeploymentFailedError and ReplicaDiedError may quote
# user code (a constructor's or a health check's exception), and any other EmbserveError may
# carry a reason from anywhere; their full message goes to the log instead.
_UNAVAILABLE = "no replica of this route is running; retry later"
_MESSAGES: tuple[tuple[type[BaseException], int, str | None, int], ...] = (
    # (error, status, message, log level)
    (BackPressureError, 503, None, logging.DEBUG),
    (RequestTimeoutError, 504, None, logging.INFO),
    (ReplicaDiedError, 503, "the replica serving the request stopped; retry", logging.WARNING),
    (DeploymentUnavailableError, 503, _UNAVAILABLE, logging.WARNING),
    (EmbserveError, 503, "the service is unavailable; retry later", logging.WARNING),
)


def error_response(exc: BaseException, request_id: str, endpoint: str = "") -> Response:
    """The HTTP response for an exception raised while serving a request.

    The body is ``{"error": message, "request_id": id}``. ``HTTPError``/``HTTPException`` →
    their status and detail (text the handler chose to send); body too large → 413 and body too
    slow → 408 (both closing the connection); ``BackPressureError`` and ``ReplicaDiedError`` →
    503 with ``Retry-After``; ``RequestTimeoutError`` → 504; other embserve errors → 503;
    :class:`Cancelled` → 503, closing; any other exception → 500. Only HTTP errors and the
    errors whose text embserve makes from its own values alone (body limits, back pressure,
    request timeouts) send their message; the others send a fixed text for their kind, and their
    own text, which may quote user code, is logged here with the request id (with the traceback
    for exceptions of user code), never sent.
    """
    if isinstance(exc, HTTPError):
        response = _error(exc.status, exc.detail or _reason(exc.status), request_id)
        if isinstance(exc, MethodNotAllowedError):
            response.headers["allow"] = ", ".join(sorted(exc.allowed))
        return response
    if isinstance(exc, HTTPException):
        response = _error(exc.status_code, str(exc.detail), request_id)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response
    # The rest of the body is never read, so the connection cannot carry another request.
    if isinstance(exc, BodyTooLarge):
        return _error(413, str(exc), request_id, connection="close")
    if isinstance(exc, BodyTimeout):
        return _error(408, str(exc), request_id, connection="close")
    if isinstance(exc, Cancelled):
        logger.warning(
            "request %s to %r was cancelled unanswered",
            request_id,
            endpoint,
            extra={"request_id": request_id},
        )
        stopped = "the server stopped before the request finished; retry"
        return _error(503, stopped, request_id, connection="close", **{"retry-after": "1"})
    for kind, status, message, level in _MESSAGES:
        if isinstance(exc, kind):
            logger.log(
                level,
                "request %s to %r failed: %s",
                request_id,
                endpoint,
                exc,
                extra={"request_id": request_id},
            )
            headers = {"retry-after": "1"} if status == 503 else {}
            if isinstance(exc, BackPressureError):
                headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
            return _error(status, message or str(exc), request_id, **headers)
    text = remote_traceback(exc)
    if text is None:
        logger.error(
            "request %s to %r raised %s",
            request_id,
            endpoint,
            type(exc).__name__,
            exc_info=exc,
            extra={"request_id": request_id},
        )
    else:
        logger.error(
            "request %s to %r raised %s\n%s",
            request_id,
            endpoint,
            type(exc).__name__,
            text,
            extra={"request_id": request_id},
        )
    return _error(500, "internal server error", request_id)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)
