"""HTTP inputs for the adapter's tests: JSON that must be refused, and a fuzzer of the ASGI app.

:data:`BAD_JSON` is the table of bodies Python's parser takes (or chokes on) that are not JSON;
:func:`check_app_survives` drives an :class:`~embserve_asgi.App` with hypothesis-made requests,
called directly (no server): scopes, percent-encoded and unicode paths, headers (the routing
headers among them), bodies in several ``http.request`` messages, bodies that stall, and clients
that leave at any point. Every call is bounded in time; none may get a 5xx or go unanswered.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

import embserve
from embserve_asgi.app import App

#: (name, body): bodies a JSON handler must answer with 400 and a message, never 500.
BAD_JSON: list[tuple[str, bytes]] = [
    ("NaN", b"NaN"),
    ("NaN in an array", b"[1, NaN]"),
    ("Infinity", b"Infinity"),
    ("-Infinity in an object", b'{"x": -Infinity}'),
    ("1e999", b"1e999"),
    ("-1e999 in an array", b"[-1e999]"),
    ("a mantissa too long for a double", b"1" + b"0" * 400 + b".5"),
    ("an integer of 5000 digits", b"7" * 5000),
    ("a lone high surrogate", b'"\\ud800"'),
    ("a lone low surrogate", b'{"k": "\\uDC00"}'),
    ("a lone surrogate as a key", b'{"\\ud800": 1}'),
    ("a surrogate pair reversed", b'["\\udc00\\ud800"]'),
    ("1,000 nested arrays", b"[" * 1000 + b"]" * 1000),
    ("1,000 nested objects", b'{"a":' * 1000 + b"1" + b"}" * 1000),
    ("1,000 unclosed arrays", b"[" * 1000),
    ("100,000 unclosed arrays", b"[" * 100_000),
    ("not UTF-8", b'"\xff"'),
    ("a surrogate encoded in UTF-8", b'"\xed\xa0\x80"'),
    ("empty", b""),
    ("truncated", b'{"a": '),
]

#: (body, value): JSON near those limits that must still parse.
GOOD_JSON: list[tuple[bytes, Any]] = [
    (b'"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
    (b"[" * 150 + b"]" * 150, json.loads("[" * 150 + "]" * 150)),
    (b'["[[[[[[", "\\\\ud800"]', ["[[[[[[", "\\ud800"]),  # brackets and escapes inside strings
    (b"1e308", 1e308),
    (b"-0.0", -0.0),
    (b"7" * 4000, int("7" * 4000)),
]

FUZZ_BODY_TIMEOUT_S = 0.05
FUZZ_MAX_BODY = 4096
CALL_TIMEOUT_S = 10.0


@embserve.deployment
class Echo:
    """Echoes JSON bodies; describes others."""

    async def __call__(self, request: Request) -> Any:
        if request.headers.get("content-type", "").startswith("application/json"):
            return {"json": await request.json()}
        body = await request.body()
        return {
            "size": len(body),
            "path": request.scope["path"],
            "query": dict(request.query_params),
            "headers": len(request.headers),
        }


@embserve.deployment
def text(request: Request) -> str:
    """Answers text made of the path and the query, unicode and all (a sync handler)."""
    return f"{request.scope['path']}?{request.query_params.get('q', '')}"


@embserve.deployment
class Stream:
    """Streams a few items of each kind."""

    async def __call__(self, request: Request) -> AsyncIterator[Any]:
        yield "text\n"
        yield {"n": 1}
        await asyncio.sleep(0)
        yield {"n": 2}


@embserve.deployment
async def slow(request: Request) -> str:
    """Runs long enough for a disconnect to be noticed."""
    await asyncio.sleep(0.03)
    return "done"


@embserve.deployment
class PostOnly:
    """Answers POST only."""

    http_methods = ("POST",)

    def __call__(self, request: Request) -> str:
        return "posted"


@embserve.deployment(num_replicas=2, router="consistent_hash")
def sticky(request: Request) -> dict[str, Any]:
    """Answers the routing options its request came with."""
    context = embserve.get_request_context()
    return {"key": context.routing_key, "model": context.multiplexed_model_id}


@embserve.deployment
def not_finite(request: Request) -> Any:
    """Returns what JSON cannot hold."""
    return {"nan": math.nan, "inf": [math.inf, -math.inf], "text": "lone \ud800"}


ROUTES = {
    "/echo": Echo.bind(),
    "/text": text.bind(),
    "/stream": Stream.bind(),
    "/slow": slow.bind(),
    "/post": PostOnly.bind(),
    "/sticky": sticky.bind(),
    "/nan": not_finite.bind(),
}


def fuzz_app() -> App:
    """The App the fuzzer drives: every kind of handler, small limits, a short body deadline."""
    return App(ROUTES, max_body_size=FUZZ_MAX_BODY, body_timeout_s=FUZZ_BODY_TIMEOUT_S)


# -- requests ---------------------------------------------------------------------------------

# Header values as an HTTP/1.1 server passes them on: visible ASCII, spaces, obs-text.
header_values = st.binary(max_size=40).map(
    lambda raw: bytes(b for b in raw if b in (0x09, 0x20) or (b > 0x20 and b != 0x7F)).strip(b" \t")
)
header_names = st.sampled_from(
    [
        b"embserve-priority",
        b"embserve-routing-key",
        b"embserve-model-id",
        b"serve_multiplexed_model_id",
        b"x-request-id",
        b"content-type",
        b"accept",
        b"host",
        b"x-anything",
        b"cookie",
    ]
)
priorities = st.one_of(
    st.integers(-(10**30), 10**30).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b" 7 ", b"1_000", b"x", b"1.5", b"9" * 300, b"\xff"]),
)
content_lengths = st.one_of(
    st.none(),
    st.just("exact"),
    st.integers(0, 10_000).map(lambda n: str(n).encode()),
    st.sampled_from([b"-1", b"-5", b"abc", b"", b"1e3", b"99999999999999999999"]),
)
path_text = st.text(st.characters(codec="utf-8") | st.sampled_from("/%?#.-~ "), max_size=20)
bodies = st.one_of(
    st.sampled_from([body for _, body in BAD_JSON if len(body) <= FUZZ_MAX_BODY]),
    st.sampled_from([body for body, _ in GOOD_JSON]),
    st.binary(max_size=300),
    st.just(b"x" * (FUZZ_MAX_BODY + 1)),  # one byte over the limit
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """One request: its scope and the messages its client sends, with how it ends."""
    prefix = draw(st.sampled_from([*ROUTES, "/", "/nowhere", "/-/status", "/-/healthz", ""]))
    tail = draw(st.one_of(st.just(""), path_text.map(lambda t: "/" + t)))
    # Paths come percent-encoded on the wire; the server decodes them into `path`.
    raw_path = urllib.parse.quote(prefix + tail, safe="/").encode("ascii")
    if draw(st.booleans()):  # or encoded oddly: bytes that are not UTF-8, broken escapes
        raw_path += draw(st.sampled_from([b"%ff%fe", b"%", b"%zz", b"%00", b"%2F.."]))
    path = urllib.parse.unquote(raw_path.decode("ascii"), errors="replace")
    body = draw(bodies)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    headers: list[tuple[bytes, bytes]] = []
    for name in draw(st.lists(header_names, max_size=6)):
        value = draw(priorities if name == b"embserve-priority" else header_values)
        if name == b"content-type" and draw(st.booleans()):
            value = b"application/json"
        headers.append((name, value))
    length = draw(content_lengths)
    if length == "exact":
        headers.append((b"content-length", str(len(body)).encode()))
    elif isinstance(length, bytes):
        headers.append((b"content-length", length))
    return {
        "scope": {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": draw(st.sampled_from(["1.0", "1.1", "2"])),
            "method": draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"])),
            "scheme": draw(st.sampled_from(["http", "https"])),
            "path": path,
            "raw_path": raw_path,
            "root_path": draw(st.sampled_from(["", "", "/ml"])),
            "query_string": urllib.parse.quote(draw(path_text), safe="=&").encode("ascii"),
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        },
        "chunks": chunks,
        # complete: the body ends; stall: it never does; disconnect: the client leaves after
        # `leave_at` messages of the body. After a whole body the client waits or leaves.
        "ending": draw(st.sampled_from(["complete", "complete", "complete", "stall", "leave"])),
        "leave_at": draw(st.integers(0, len(chunks))),
        "then_leave": draw(st.booleans()),
    }


def _messages(case: dict[str, Any]) -> list[dict[str, Any]]:
    chunks: list[bytes] = case["chunks"]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    if case["ending"] == "stall":
        messages[-1]["more_body"] = True
    elif case["ending"] == "leave":
        messages = [*messages[: case["leave_at"]], {"type": "http.disconnect"}]
    elif case["then_leave"]:
        messages.append({"type": "http.disconnect"})
    return messages


async def drive(app: App, case: dict[str, Any]) -> list[dict[str, Any]]:
    """Call ``app`` with one fuzzed request; return what it sent."""
    script = _messages(case)
    left = script[-1]["type"] == "http.disconnect"
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if script:
            message = script.pop(0) if len(script) > 1 or not left else script[0]
            return message
        await forever.wait()  # a client that sent its whole request and waits
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await asyncio.wait_for(app(dict(case["scope"]), receive, send), CALL_TIMEOUT_S)
    return sent


def check_answer(case: dict[str, Any], sent: list[dict[str, Any]]) -> None:
    """What ``drive`` sent is one whole, well-formed answer of no 5xx (or none: client gone)."""
    starts = [m for m in sent if m["type"] == "http.response.start"]
    left = _messages(case)[-1]["type"] == "http.disconnect"
    if not starts:
        assert left, f"no answer to a client that stayed: {sent}"
        return
    assert len(starts) == 1 and sent[0] is starts[0], sent
    status = starts[0]["status"]
    assert 200 <= status < 500, f"{status} for {case}: {sent}"
    bodies = sent[1:]
    assert bodies and all(m["type"] == "http.response.body" for m in bodies), sent
    if not left:
        assert not bodies[-1].get("more_body", False), "the body never ended"
    headers = dict(starts[0]["headers"])
    request_id = headers[b"x-request-id"].decode("latin-1")
    if status >= 400:
        error = json.loads(b"".join(m.get("body", b"") for m in bodies))
        assert set(error) == {"error", "request_id"} and error["request_id"] == request_id


def check_app_survives(max_examples: int) -> None:
    """Fuzz a fresh :func:`fuzz_app` with ``max_examples`` requests on one event loop."""
    app = fuzz_app()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(app.startup())

        @given(requests())
        @settings(
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        def one(case: dict[str, Any]) -> None:
            sent = loop.run_until_complete(drive(app, case))
            check_answer(case, sent)
            # Every request stops being watched once answered: no timer or listener is kept.
            assert not app._watchers.active

        one()
    finally:
        loop.run_until_complete(app.shutdown())
        loop.close()
