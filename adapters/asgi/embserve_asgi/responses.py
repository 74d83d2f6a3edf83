"""What a deployment returns or raises, turned into an HTTP response.

Return values: ``dict``, ``list``, numbers, ``None``, numpy arrays and dataclasses become JSON;
``str`` text; ``bytes`` an octet-stream; a Starlette ``Response`` goes out as it is; generators
are streamed (see :func:`is_stream`). Errors follow one table (see :func:`error_response`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from embserve.errors import (
    BackPressureError,
    EmbserveError,
    HTTPError,
    MethodNotAllowedError,
    ReplicaDiedError,
    RequestTimeoutError,
    remote_traceback,
)
from embserve_asgi.requests import BodyTooLarge

__all__ = ["error_response", "is_stream", "json_bytes", "render", "send_plain", "to_response"]

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
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")


_encode = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=_default, allow_nan=False
).encode


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (numpy values and dataclasses included)."""
    return _encode(value).encode("utf-8")


def is_stream(value: Any) -> bool:
    """Whether a returned value is a generator to stream rather than a value to send."""
    return inspect.isgenerator(value) or inspect.isasyncgen(value)


def render(value: Any) -> tuple[bytes, bytes]:
    """The body and content type of a plain return value (anything but a ``Response``)."""
    kind = type(value)
    if kind is dict or kind is list:
        return json_bytes(value), JSON_BYTES
    if kind is str:
        return value.encode("utf-8"), TEXT_BYTES
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
        return item.encode("utf-8")
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


def error_response(exc: BaseException, request_id: str, endpoint: str = "") -> Response:
    """The HTTP response for an exception raised while serving a request.

    ``HTTPError``/``HTTPException`` → their status; body too large → 413; ``BackPressureError``
    and ``ReplicaDiedError`` → 503 with ``Retry-After``; ``RequestTimeoutError`` → 504; other
    embserve errors → 503; any other exception → 500 whose body names no detail (the traceback is
    logged here with the request id).
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
    if isinstance(exc, BodyTooLarge):
        # The rest of the body is never read, so the connection cannot carry another request.
        return _error(413, str(exc), request_id, connection="close")
    if isinstance(exc, BackPressureError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return _error(503, str(exc), request_id, **{"retry-after": retry})
    if isinstance(exc, ReplicaDiedError):
        return _error(503, str(exc), request_id, **{"retry-after": "1"})
    if isinstance(exc, RequestTimeoutError):
        return _error(504, str(exc), request_id)
    if isinstance(exc, EmbserveError):
        logger.warning("request %s to %r failed: %s", request_id, endpoint, exc)
        return _error(503, str(exc), request_id, **{"retry-after": "1"})
    text = remote_traceback(exc)
    if text is None:
        logger.error(
            "request %s to %r raised %s", request_id, endpoint, type(exc).__name__, exc_info=exc
        )
    else:
        logger.error(
            "request %s to %r raised %s\n%s", request_id, endpoint, type(exc).__name__, text
        )
    return _error(500, "internal server error", request_id)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)
