"""Tracing: the caller's trace context reaches the replica on every way in, user code runs in
an execution span, and without OpenTelemetry nothing of it is imported."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import embserve
from tests.e2e.servers import hypercorn_server

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    yield _exporter


def trace_id() -> int:
    return int(trace.get_current_span().get_span_context().trace_id)


@embserve.deployment
class Inner:
    async def __call__(self) -> int:
        return trace_id()

    def sync(self) -> int:
        return trace_id()


@embserve.deployment
class Outer:
    def __init__(self, inner: embserve.Handle) -> None:
        self.inner = inner

    async def __call__(self, request: object = None) -> list[int]:
        return [trace_id(), await self.inner.remote(), await self.inner.sync.remote()]


def test_a_handle_call_continues_the_callers_trace(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    with embserve.Runtime() as rt:
        handle = rt.run(Outer.bind(Inner.bind()), name="outer")
        with tracer.start_as_current_span("caller") as caller:
            seen = handle.remote().result(timeout_s=5)
        expected = caller.get_span_context().trace_id
    assert seen == [expected] * 3
    finished = {span.name: span for span in spans.get_finished_spans()}
    execute = [s for s in spans.get_finished_spans() if s.name == "embserve.execute"]
    assert len(execute) == 3

    def attribute(span: ReadableSpan, name: str) -> object:
        return dict(span.attributes or {}).get(name)

    outer = next(s for s in execute if attribute(s, "embserve.deployment") == "outer")
    assert outer.parent is not None and outer.parent.span_id == caller.get_span_context().span_id
    inner = [s for s in execute if attribute(s, "embserve.deployment") == "Inner"]
    assert outer.context is not None
    assert all(s.parent is not None and s.parent.span_id == outer.context.span_id for s in inner)
    assert {attribute(s, "embserve.method") for s in inner} == {"__call__", "sync"}
    assert all(attribute(s, "embserve.request_id") for s in execute)
    assert "caller" in finished


def test_an_untraced_call_makes_no_span(spans: InMemorySpanExporter) -> None:
    with embserve.Runtime() as rt:
        assert rt.run(Inner.bind()).remote().result(timeout_s=5) == 0
    assert not spans.get_finished_spans()


def test_an_http_traceparent_is_continued_in_the_replica() -> None:
    trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = f"00-{trace_hex}-00f067aa0ba902b7-01"
    app = embserve.App({"/outer": Outer.bind(Inner.bind())})
    with hypercorn_server(app) as url:
        answer = httpx.post(f"{url}/outer", headers={"traceparent": header}, timeout=10).json()
    assert answer == [int(trace_hex, 16)] * 3


def test_a_process_replica_sees_the_callers_trace_id() -> None:
    tracer = trace.get_tracer("test")
    with embserve.Runtime(backend="process") as rt:
        handle = rt.run(Inner.bind())
        with tracer.start_as_current_span("caller") as caller:
            seen = handle.remote().result(timeout_s=30)
    assert seen == caller.get_span_context().trace_id


def test_without_opentelemetry_nothing_of_it_is_imported() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import embserve\n"
        "@embserve.deployment\n"
        "def f(x): return x\n"
        "with embserve.Runtime() as rt: assert rt.run(f.bind()).remote(2).result(5) == 2\n"
        "assert not embserve.tracing.ENABLED\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry') and sys.modules[m]]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
