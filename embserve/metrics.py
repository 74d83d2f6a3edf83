"""Metrics: what a runtime and its replicas measured, in the Prometheus text format.

Requests are counted where they pass, in plain Python structures that cost a few hundred
nanoseconds a request (no lock, no label look-up: everything runs on the runtime's loop);
``prometheus_client`` is imported, and one ``CollectorRegistry`` per runtime built, only when
:meth:`Runtime.metrics() <embserve.Runtime.metrics>` is called (or ``/-/metrics`` scraped).
What replicas measure themselves (execution time, batch sizes, model loads) is a
:class:`ReplicaStats` each, read from in-thread replicas directly and from process and Dask
replicas over the remote-replica protocol. Labels stay bounded: deployment, replica, method,
outcome, state; never a request id.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embserve._serve import RequestPath
    from embserve.replica import Replica
    from embserve.snapshot import RuntimeStatus

__all__ = ["DeploymentMetrics", "Histogram", "ReplicaStats", "exposition", "scrape"]

logger = logging.getLogger("embserve.metrics")

# How long a scrape waits for one replica's own figures.
STATS_TIMEOUT_S = 2.0

#: Bounds of the duration histograms, in seconds: from a fast in-process call to a slow model.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Bounds of the batch size histogram, in items.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: Observations a histogram keeps before it puts them in their buckets.
PENDING_MAX = 512
_flushing = threading.Lock()  # one flush at a time: taken once per PENDING_MAX observations

#: How a request ended (the ``outcome`` label of ``embserve_requests``).
OUTCOMES = ("ok", "error", "timeout", "rejected", "cancelled")


class Histogram:
    """Counts of observations per bucket (cumulated only when exported), their sum and count.

    An observation is appended to a short list and put in its bucket with the others of the
    list once it is full, or when the histogram is read: far cheaper per request than finding
    its bucket at once.
    """

    __slots__ = ("_counts", "_sum", "bounds", "pending")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        #: Observations not yet in their buckets (:meth:`flush` puts them there).
        self.pending: list[float] = []

    def observe(self, value: float) -> None:
        """Count one observation."""
        pending = self.pending
        pending.append(value)
        if len(pending) >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Put the pending observations in their buckets.

        Safe from any thread (sync callers observe from theirs, see ``ReplicaHost.run_here``).
        """
        with _flushing:
            pending, self.pending = self.pending, []
            if not pending:
                return
            # Sorted, each bucket's count is where its bound falls among them: a step per
            # bucket rather than per observation (bucket i holds bounds[i - 1] < v <= bounds[i]).
            pending.sort()
            counts = self._counts
            where = bisect.bisect_right
            below = 0
            for index, bound in enumerate(self.bounds):
                upto = where(pending, bound, below)
                counts[index] += upto - below
                below = upto
            counts[-1] += len(pending) - below
            self._sum += sum(pending)

    @property
    def counts(self) -> list[int]:
        """Observations per bucket (not cumulated), the last above every bound."""
        self.flush()
        return self._counts

    @property
    def sum(self) -> float:
        """The sum of the observations."""
        self.flush()
        return self._sum

    def add(self, counts: Sequence[int], total: float) -> None:
        """Add another histogram's counts (same bounds) and sum."""
        mine = self.counts
        for index, count in enumerate(counts):
            mine[index] += count
        self._sum += total

    def add_to_bucket(self, index: int, count: int, total: float) -> None:
        """Add ``count`` observations summing to ``total`` to bucket ``index``."""
        self.counts[index] += count
        self._sum += total

    @property
    def count(self) -> int:
        """Observations counted."""
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(upper bound, count)`` pairs as Prometheus writes them, +Inf last."""
        self.flush()
        pairs: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            running += count
            pairs.append((_bound(bound), running))
        pairs.append(("+Inf", running + self._counts[-1]))
        return pairs


def _bound(value: float) -> str:
    return repr(float(value))


class DeploymentMetrics:
    """What the runtime measured of one deployment's requests (on the runtime's loop)."""

    __slots__ = ("duration", "queue_wait", "requests", "restarts", "shadow_requests")

    def __init__(self) -> None:
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.duration = Histogram()
        self.queue_wait = Histogram()
        self.shadow_requests = 0
        self.restarts = 0

    def finished(self, outcome: str, duration_s: float) -> None:
        """One request ended with ``outcome`` after ``duration_s`` (queueing included)."""
        self.requests[outcome] += 1
        pending = self.duration.pending  # Histogram.observe, without its call: once a request
        pending.append(duration_s)
        if len(pending) >= PENDING_MAX:
            self.duration.flush()

    def finished_all(self, outcome: str, durations_s: list[float]) -> None:
        """:meth:`finished` for each of ``durations_s``, all with ``outcome`` (a batch)."""
        self.requests[outcome] += len(durations_s)
        pending = self.duration.pending
        pending.extend(durations_s)
        if len(pending) >= PENDING_MAX:
            self.duration.flush()


@dataclasses.dataclass
class ReplicaStats:
    """What one replica measured itself: plain values, sent as they are across processes.

    Attributes:
        execution: per method, the histogram counts (over :data:`DURATION_BUCKETS`) and the sum
            of the time its calls ran in user code.
        batch_sizes: per batched method, how many batches had each size.
        model_loads: models loaded by multiplexed loaders.
    """

    execution: dict[str, tuple[list[int], float]] = dataclasses.field(default_factory=dict)
    batch_sizes: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    model_loads: int = 0


# -- the text exposition --------------------------------------------------------------------


async def scrape(status: RuntimeStatus, deployments: Sequence[RequestPath]) -> str:
    """The Prometheus text of a runtime: its deployments' figures and those their running
    replicas measured (asked for at once; one that cannot answer is left out of this one)."""
    replicas = [(d.name, r) for d in deployments for r in d.running]

    async def stats_of(replica: Replica) -> ReplicaStats | None:
        try:
            return await asyncio.wait_for(replica.stats(), STATS_TIMEOUT_S)
        except Exception:
            logger.debug("no stats from replica %s", replica.replica_id, exc_info=True)
            return None

    answers = await asyncio.gather(*(stats_of(r) for _, r in replicas))
    per_replica = {
        (deployment, replica.replica_id): stats
        for (deployment, replica), stats in zip(replicas, answers, strict=True)
        if stats is not None
    }
    return exposition(status, {d.name: d.metrics for d in deployments}, per_replica).decode()


def exposition(
    status: RuntimeStatus,
    deployments: Mapping[str, DeploymentMetrics],
    replicas: Mapping[tuple[str, str], ReplicaStats],
) -> bytes:
    """The Prometheus text of one runtime, built in a registry of its own."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        from embserve.errors import EmbserveError

        raise EmbserveError(
            "metrics need prometheus-client: pip install prometheus-client"
        ) from None
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def histogram(name: str, doc: str, labels: list[str]) -> Any:
        return HistogramMetricFamily(name, doc, labels=labels)

    class _Collector:
        def collect(self) -> Iterable[Any]:
            requests = CounterMetricFamily(
                "embserve_requests",
                "Requests that ended, by deployment and outcome.",
                labels=["deployment", "outcome"],
            )
            duration = histogram(
                "embserve_request_duration_seconds",
                "Time from a request's start to its end, queueing included.",
                ["deployment"],
            )
            queue_wait = histogram(
                "embserve_queue_wait_seconds",
                "Time requests waited for a free replica.",
                ["deployment"],
            )
            shadows = CounterMetricFamily(
                "embserve_shadow_requests",
                "Copies of requests sent to shadow deployments.",
                labels=["deployment"],
            )
            restarts = CounterMetricFamily(
                "embserve_replica_restarts",
                "Replicas started to replace one that died or failed its health check.",
                labels=["deployment"],
            )
            for name, measured in sorted(deployments.items()):
                for outcome, count in measured.requests.items():
                    requests.add_metric([name, outcome], count)
                _add(duration, [name], measured.duration)
                # Only requests that waited were timed; the others waited 0 s.
                waits = Histogram()
                waits.add(measured.queue_wait.counts, measured.queue_wait.sum)
                waits.add_to_bucket(
                    0, max(0, measured.duration.count - measured.queue_wait.count), 0.0
                )
                _add(queue_wait, [name], waits)
                shadows.add_metric([name], measured.shadow_requests)
                restarts.add_metric([name], measured.restarts)
            yield from (requests, duration, queue_wait, shadows, restarts)
            yield from _gauges(status, GaugeMetricFamily)
            yield from _replica_families(replicas, histogram, CounterMetricFamily)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    text: bytes = generate_latest(registry)
    return text


def _add(family: Any, labels: list[str], histogram: Histogram) -> None:
    family.add_metric(labels, histogram.buckets(), histogram.sum)


def _gauges(status: RuntimeStatus, gauge: Any) -> Iterable[Any]:
    ongoing = gauge(
        "embserve_ongoing_requests",
        "Requests in flight on each replica (sync code still running counts).",
        labels=["deployment", "replica"],
    )
    queued = gauge(
        "embserve_queued_requests",
        "Requests waiting for a free replica.",
        labels=["deployment"],
    )
    replicas = gauge("embserve_replicas", "Replicas by state.", labels=["deployment", "state"])
    from embserve.replica import ReplicaState

    for name, deployment in sorted(status.deployments.items()):
        queued.add_metric([name], deployment.queued_requests)
        counts = dict.fromkeys((s.value for s in ReplicaState), 0)
        for replica in deployment.replicas:
            counts[replica.state.value] += 1
            ongoing.add_metric([name, replica.replica_id], replica.ongoing_requests)
        for state, count in counts.items():
            replicas.add_metric([name, state], count)
    yield from (ongoing, queued, replicas)


def _replica_families(
    replicas: Mapping[tuple[str, str], ReplicaStats], histogram: Any, counter: Any
) -> Iterable[Any]:
    execution = histogram(
        "embserve_execution_seconds",
        "Time calls ran in user code, measured in the replica.",
        ["deployment", "replica", "method"],
    )
    batches = histogram(
        "embserve_batch_size",
        "Items per batch of batched methods, measured in the replica.",
        ["deployment", "replica", "method"],
    )
    loads = counter(
        "embserve_model_loads",
        "Models loaded by multiplexed loaders, measured in the replica.",
        labels=["deployment", "replica"],
    )
    for (deployment, replica), stats in sorted(replicas.items()):
        for method, (counts, total) in sorted(stats.execution.items()):
            measured = Histogram()
            measured.add(counts, total)
            _add(execution, [deployment, replica, method], measured)
        for method, sizes in sorted(stats.batch_sizes.items()):
            measured = Histogram(BATCH_BUCKETS)
            for size, count in sizes.items():
                measured.add_to_bucket(
                    bisect.bisect_left(BATCH_BUCKETS, size), count, float(size * count)
                )
            _add(batches, [deployment, replica, method], measured)
        loads.add_metric([deployment, replica], stats.model_loads)
    yield from (execution, batches, loads)
