"""HTTP requests on their way to a replica: read with a size limit, sent as a snapshot.

The App reads the body, packs what a handler may look at into a :class:`RequestSnapshot` (plain
values, cheap to pickle when the replica lives in another process), and the replica's host turns
it back into a Starlette :class:`~starlette.requests.Request` just before user code runs.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope

from embserve.errors import HTTPError
from embserve.request import Request as EmbserveRequest

__all__ = [
    "MAX_JSON_DEPTH",
    "ROUTING_HEADERS",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientGone",
    "HTTPRequest",
    "RequestSnapshot",
    "apply_routing_headers",
    "parse_json",
    "read_body",
]


class BodyTooLarge(Exception):
    """The request body is larger than the App's ``max_body_size`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    """The request body did not arrive within the App's ``body_timeout_s`` (HTTP 408)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")
        self.timeout_s = timeout_s


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, or :class:`BodyTooLarge` as soon as it passes ``limit`` bytes.

    The body is refused at the chunk that crosses the limit, so no more than ``limit`` bytes
    plus one chunk are ever held, and the rest is never read. (A ``Content-Length`` over the
    limit is refused by the App before this is called.)
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect before the body ended
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


#: Request bodies nested deeper than this (arrays and objects) are refused by
#: :func:`parse_json`. Far above what real documents use, far below what would exhaust Python's
#: recursion limit when the value is parsed, or rendered again in a response.
MAX_JSON_DEPTH = 200

_INFINITY = math.inf
# Everything but the bytes that open or close arrays, objects and strings (and the backslash,
# which escapes a quote): what is left tells how deep a document is nested.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"\\')
# A \uD800-\uDFFF escape: a surrogate, which is only valid JSON text as half of a pair.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value == _INFINITY or value == -_INFINITY:
        raise ValueError(f"the number {text[:20]}... does not fit in a double")
    return value


def _nesting(body: bytes) -> int:
    """How deep ``body`` nests arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body.translate(None, _NOT_STRUCTURE):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


def parse_json(body: bytes) -> Any:
    """``body`` decoded as strict JSON (RFC 8259, I-JSON's limits on numbers and strings).

    Python's parser accepts more than JSON: ``NaN``, ``Infinity``, numbers too large for a
    double (``1e999`` becomes ``inf``) and lone surrogates (``"\\ud800"``), all of which a
    handler could not send back as JSON either. Those, a body that is not UTF-8, and one nested
    deeper than :data:`MAX_JSON_DEPTH` raise ``embserve.HTTPError(400)`` saying what is wrong.
    """
    # Cheap checks first (C-speed counts and searches); the slower exact ones run only when
    # these say they might find something.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nesting(body) > MAX_JSON_DEPTH:
        raise HTTPError(400, f"the request body is JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the request body is not UTF-8 text, so not JSON") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
    except ValueError as exc:  # a constant or number refused above, an int of > 4300 digits
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # nested within the limit, but called with the stack nearly full
        raise HTTPError(400, "the request body is JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body) is not None and _has_surrogate(value):
        raise HTTPError(400, "the request body is not valid JSON: it holds a lone surrogate")
    return value


class HTTPRequest(Request):
    """The Starlette request a deployment receives.

    It is a :class:`starlette.requests.Request` whose :meth:`json` parses strict JSON and
    answers a body that is not with HTTP 400 rather than a server error.
    """

    async def json(self) -> Any:
        """The body decoded as JSON; raises ``embserve.HTTPError(400)`` when it is not JSON.

        See :func:`parse_json` for what is refused beyond Python's own parser.
        """
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class RequestSnapshot:
    """Everything a handler may read of one HTTP request, as plain picklable values.

    Replica hosts call :meth:`__embserve_materialize__` on it to get the
    :class:`HTTPRequest` that user code receives.
    """

    __slots__ = (
        "body",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query_string",
        "request_id",
        "root_path",
        "route_prefix",
        "scheme",
        "server",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: tuple[str, int] | None = None,
        server: tuple[str, int | None] | None = None,
        scheme: str = "http",
        root_path: str = "",
        http_version: str = "1.1",
        request_id: str = "",
        route_prefix: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.client = client
        self.server = server
        self.scheme = scheme
        self.root_path = root_path
        self.http_version = http_version
        self.request_id = request_id
        self.route_prefix = route_prefix

    @classmethod
    def from_scope(
        cls, scope: Scope, body: bytes, request_id: str, route_prefix: str = ""
    ) -> RequestSnapshot:
        """The snapshot of the request described by an ASGI ``scope`` and its ``body``, sent
        to the endpoint of ``route_prefix``."""
        # The server made these for this request alone: kept, not copied. Set one by one
        # rather than through __init__'s keywords: this runs for every request.
        get = scope.get
        snapshot = cls.__new__(cls)
        snapshot.method = scope["method"]
        snapshot.path = scope["path"]
        snapshot.query_string = get("query_string", b"")
        snapshot.headers = scope["headers"]
        snapshot.body = body
        snapshot.client = get("client")
        snapshot.server = get("server")
        snapshot.scheme = get("scheme", "http")
        snapshot.root_path = get("root_path", "")
        snapshot.http_version = get("http_version", "1.1")
        snapshot.request_id = request_id
        snapshot.route_prefix = route_prefix
        return snapshot

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    def __embserve_materialize__(self) -> HTTPRequest:
        """The Starlette request this snapshot stands for (called in the replica)."""
        body = self.body
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "root_path": self.root_path,
            "query_string": self.query_string,
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
            "state": {"request_id": self.request_id},
            # Where the App routed it from: an ingress app serves below it (its root path).
            "embserve.route_prefix": self.route_prefix,
        }
        return HTTPRequest(scope, receive)

    def __repr__(self) -> str:
        return f"<RequestSnapshot {self.method} {self.path} id={self.request_id}>"


#: Headers that set a request's routing options, as ``handle.options(...)`` does: its priority,
#: routing key and multiplexed model id (``serve_multiplexed_model_id`` is Ray Serve's name);
#: and the W3C trace context (``traceparent``, ``tracestate``) that tracing continues.
ROUTING_HEADERS = frozenset(
    {
        b"embserve-priority",
        b"embserve-routing-key",
        b"embserve-model-id",
        b"serve_multiplexed_model_id",
        b"traceparent",
        b"tracestate",
    }
)
_MAX_OPTION_LENGTH = 256


def apply_routing_headers(request: EmbserveRequest, headers: dict[bytes, bytes]) -> None:
    """Set ``request``'s routing options from the :data:`ROUTING_HEADERS` among ``headers``.

    Raises :class:`~embserve.HTTPError` 400 for a value that is not valid.
    """
    for name, raw in headers.items():
        if len(raw) > _MAX_OPTION_LENGTH:
            raise HTTPError(400, f"header {name.decode()} is longer than {_MAX_OPTION_LENGTH}")
        value = raw.decode("latin-1").strip()
        if name == b"embserve-priority":
            try:
                request.priority = int(value)
            except ValueError:
                raise HTTPError(400, "header embserve-priority must be an integer") from None
        elif name == b"embserve-routing-key":
            request.routing_key = value
        elif name in (b"traceparent", b"tracestate"):
            # The W3C trace context, handed to OpenTelemetry's propagator in the replica.
            context = dict(request.trace_context or {})
            context[name.decode()] = value
            request.trace_context = context
        else:
            request.multiplexed_model_id = value
