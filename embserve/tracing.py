"""Tracing with OpenTelemetry, when ``opentelemetry-api`` is installed (and never imported
otherwise: without it, this module costs one boolean test per request).

The caller's trace context travels with each request (``Request.trace_context``: the W3C
``traceparent`` and friends, as OpenTelemetry's propagator writes them), from a handle call or
an HTTP request's ``traceparent`` header into the replica, on every backend. The replica runs
user code inside an ``embserve.execute`` span (the deployment, replica, method and request id as
attributes), so spans that user code starts, and calls it makes through handles, are its
children; a request that waits for a free replica gets an ``embserve.queue`` span too. Spans
go wherever the application's OpenTelemetry SDK sends them; embserve configures none.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["ENABLED", "capture", "span"]

#: Whether OpenTelemetry's API is installed (looked up once, without importing it).
ENABLED = importlib.util.find_spec("opentelemetry") is not None

_api: Any = None
#: OpenTelemetry's own context variable, once tracing was first used and when its runtime
#: context keeps one (the default): an empty context there means no span, found without a call
#: into OpenTelemetry (what a handle call checks before :func:`capture`). None: ask it.
context_variable: Any = None


def _otel() -> Any:
    global _api, context_variable
    if _api is None:
        from opentelemetry import context, propagate, trace

        runtime = getattr(context, "_RUNTIME_CONTEXT", None)
        variable = getattr(runtime, "_current_context", None)
        if isinstance(variable, contextvars.ContextVar):
            context_variable = variable
        _api = (propagate, trace, trace.get_tracer("embserve"))
    return _api


def capture() -> dict[str, str] | None:
    """The current trace context as a carrier, or None when no span is active."""
    variable = context_variable
    if variable is not None and not variable.get():
        return None  # the usual case: nothing is traced here
    propagate, trace, _ = _api or _otel()
    if context_variable is not None and not context_variable.get():
        return None
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def span(
    name: str, carrier: Mapping[str, str] | None, attributes: Mapping[str, Any]
) -> Iterator[None]:
    """A span named ``name``, the child of the context in ``carrier``, current inside."""
    propagate, _, tracer = _otel()
    parent = propagate.extract(dict(carrier)) if carrier else None
    with tracer.start_as_current_span(name, context=parent, attributes=dict(attributes)):
        yield
