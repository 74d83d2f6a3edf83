"""The admin routes under ``/-/`` and the request metrics the App keeps per endpoint.

``/-/healthz`` (200 while the process answers: liveness), ``/-/ready`` (200 when every route
has a running replica, else 503 saying which has none), ``/-/routes``, ``/-/status``
(``Runtime.status()`` as JSON) and ``/-/metrics`` (Prometheus text: the App's HTTP series and
its runtime's, see ``Runtime.metrics()``). The HTTP counters are plain integers on the request
path; they become Prometheus families only when scraped.

With an admin token every page but ``/-/healthz`` (which probes call without credentials) asks
for ``Authorization: Bearer <token>`` and answers 401 otherwise. Even so the pages show states
and counts but none of the status's free text: a deployment's or replica's ``message`` may quote
a user exception (a constructor that raised, a failed health check), and a token is often shared
with dashboards. ``rt.status()`` and the log keep the messages.
"""

from __future__ import annotations

import bisect
import hmac
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from starlette.responses import Response

from embserve.errors import HTTPError
from embserve.runtime import Runtime
from embserve_asgi.responses import JSON, error_response, json_bytes

__all__ = [
    "ADMIN_TOKEN_ENV",
    "EndpointMetrics",
    "admin_response",
    "authorized",
    "resolve_admin_token",
    "unready",
]

ADMIN_TOKEN_ENV = "EMBSERVE_ADMIN_TOKEN"
UNGUARDED = frozenset({"healthz"})  # liveness probes carry no credentials

# Seconds; the Prometheus client's default latency buckets, kept for familiar dashboards.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class EndpointMetrics:
    """Requests, their latency and those in flight, for one endpoint (event-loop confined)."""

    __slots__ = ("bucket_counts", "in_flight", "latency_count", "latency_sum", "statuses")

    def __init__(self) -> None:
        self.in_flight = 0
        self.statuses: dict[int, int] = {}
        self.bucket_counts = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def finished(self, status: int, seconds: float) -> None:
        """Record one answered request."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1


def prometheus_text(metrics: Mapping[str, EndpointMetrics]) -> bytes:
    """The metrics in the Prometheus text exposition format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Iterator[Any]:
            requests = CounterMetricFamily(
                "embserve_http_requests",
                "HTTP requests answered, by endpoint and status code.",
                labels=["endpoint", "status"],
            )
            latency = HistogramMetricFamily(
                "embserve_http_request_duration_seconds",
                "Time from request to the start of the response, by endpoint.",
                labels=["endpoint"],
            )
            in_flight = GaugeMetricFamily(
                "embserve_http_requests_in_flight",
                "HTTP requests being served, by endpoint.",
                labels=["endpoint"],
            )
            for name, m in sorted(metrics.items()):
                for status, count in sorted(m.statuses.items()):
                    requests.add_metric([name, str(status)], count)
                cumulative, total = [], 0
                for bound, count in zip((*BUCKETS, float("inf")), m.bucket_counts, strict=True):
                    total += count
                    cumulative.append((_bound(bound), total))
                latency.add_metric([name], cumulative, m.latency_sum)
                in_flight.add_metric([name], m.in_flight)
            yield requests
            yield latency
            yield in_flight

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    text: bytes = generate_latest(registry)
    return text


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def resolve_admin_token(given: str | None) -> str | None:
    """The token guarding the admin pages: ``given``, else ``$EMBSERVE_ADMIN_TOKEN``; "" is none."""
    if given is None:
        given = os.environ.get(ADMIN_TOKEN_ENV)
    if given is not None and not isinstance(given, str):
        raise TypeError(f"admin_token must be a str or None, got {type(given).__name__}")
    return given or None


def authorized(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """Whether the request's ``Authorization`` header is ``Bearer <token>``."""
    expected = token.encode("utf-8")
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            # compare_digest takes as long whatever the guess, so timing tells nothing of it.
            return scheme.lower() == b"bearer" and hmac.compare_digest(
                credentials.strip(), expected
            )
    return False


def unauthorized(request_id: str) -> Response:
    """The 401 for an admin page asked for without the token."""
    detail = "this admin page needs the header Authorization: Bearer <admin token>"
    response = error_response(HTTPError(401, detail), request_id)
    response.headers["www-authenticate"] = "Bearer"
    return response


def _json(value: Any, status: int = 200) -> Response:
    return Response(json_bytes(value), status_code=status, media_type=JSON)


def admin_response(
    path: str,
    runtime: Runtime,
    routes: Mapping[str, str],
    metrics: Mapping[str, EndpointMetrics],
    *,
    started: bool,
) -> Response | None:
    """The answer to admin ``path`` (the part after ``/-/``), or None when there is no such page."""
    if path == "healthz":  # liveness: the process answers
        return _json({"status": "ok"})
    if path == "ready":
        return _ready(runtime, routes, started=started)
    if path == "routes":
        endpoints = runtime.status().endpoints
        return _json(
            {
                prefix: {
                    "endpoint": name,
                    "traffic": dict(endpoints[name].traffic) if name in endpoints else {},
                }
                for prefix, name in sorted(routes.items())
            }
        )
    if path == "status":
        return _json(_without_messages(runtime.status().to_dict()))
    return None


def metrics_response(http: bytes, runtime_text: str) -> Response:
    """``/-/metrics``: the App's HTTP series and its runtime's (``Runtime.metrics()``)."""
    return Response(
        http + runtime_text.encode(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def _ready(runtime: Runtime, routes: Mapping[str, str], *, started: bool) -> Response:
    if not started:
        return _json({"status": "unavailable", "why": ["the runtime has not started"]}, 503)
    why = unready(runtime, routes)
    if why:
        return _json({"status": "unavailable", "why": why}, 503)
    return _json({"status": "ok", "routes": len(routes)})


def unready(runtime: Runtime, routes: Mapping[str, str]) -> list[str]:
    """Why the routes are not ready, one line per deployment without a running replica."""
    status = runtime.status()
    why: list[str] = []
    for prefix, name in sorted(routes.items()):
        endpoint = status.endpoints.get(name)
        targets = list(endpoint.traffic) if endpoint is not None else [name]
        for target in targets:
            deployment = status.deployments.get(target)
            if deployment is None or deployment.running_replicas == 0:
                state = deployment.state if deployment is not None else "missing"
                why.append(f"{prefix} ({target}) has no running replica [{state}]")
    return why


def _without_messages(status: dict[str, Any]) -> dict[str, Any]:
    # The status as rt.status() gives it, less the free-text messages (see the module docstring).
    for deployment in status["deployments"].values():
        deployment.pop("message", None)
        for replica in deployment["replicas"]:
            replica.pop("message", None)
    return status
