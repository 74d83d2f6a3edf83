"""What a batcher reads the time from, what it measures, and the policies that set its limits.

Public through :mod:`embserve.batching`; import the names from there.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

from embserve.clock import Clock, LoopClock, Timer

__all__ = [
    "AdaptivePolicy",
    "BatchMetrics",
    "BatchPolicy",
    "Clock",
    "FixedPolicy",
    "LoopClock",
    "Timer",
]


# --------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class BatchMetrics:
    """What a batcher measured since it started, for the metrics exporter.

    Attributes:
        batches: batches run (failed ones included).
        items: items sent in those batches.
        failed_batches: batches whose call raised or returned a result of the wrong length.
        batch_sizes: how many batches had each size (in items).
        queue_wait_s_sum, queue_wait_s_max: time items waited before their batch started.
        exec_s_sum, exec_s_max: time batch calls took.
    """

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    queue_wait_s_sum: float = 0.0
    queue_wait_s_max: float = 0.0
    exec_s_sum: float = 0.0
    exec_s_max: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        """Items per batch, 0 before the first batch."""
        return self.items / self.batches if self.batches else 0.0

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy, safe to hand to another thread."""
        return {
            "batches": self.batches,
            "items": self.items,
            "failed_batches": self.failed_batches,
            "batch_sizes": dict(self.batch_sizes),
            "mean_batch_size": self.mean_batch_size,
            "queue_wait_s_sum": self.queue_wait_s_sum,
            "queue_wait_s_max": self.queue_wait_s_max,
            "exec_s_sum": self.exec_s_sum,
            "exec_s_max": self.exec_s_max,
        }


# --------------------------------------------------------------------------- policies


class BatchPolicy(ABC):
    """Decides how large a batch may be and how long its first item may wait.

    Called on the batcher's loop only. ``quiesce`` asks the batcher to send a batch as soon as a
    loop turn brings no new item, instead of waiting for the timer.
    """

    quiesce: bool = False
    #: The hard limit: no batch ever costs more, and a single item costing more is refused.
    max_batch_size: int

    @abstractmethod
    def max_size(self) -> int:
        """The largest batch cost (items, or ``batch_size_fn`` units) to send now."""

    @abstractmethod
    def wait_s(self) -> float:
        """How long the first waiting item may wait before its batch leaves."""

    def observe(self, size: int, exec_s: float) -> None:  # noqa: B027 (optional hook)
        """Learn from one finished batch of ``size`` items that ran ``exec_s`` seconds."""


class FixedPolicy(BatchPolicy):
    """``max_batch_size`` and ``batch_wait_timeout_s`` as given (changeable at run time)."""

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    def max_size(self) -> int:
        """``max_batch_size``."""
        return self.max_batch_size

    def wait_s(self) -> float:
        """``batch_wait_timeout_s``."""
        return self.batch_wait_timeout_s


class AdaptivePolicy(BatchPolicy):
    """Picks size and wait from measured batch times so that requests meet ``target_latency_s``.

    It fits ``exec(n) = fixed + per_item * n`` to recent batches (exponentially weighted least
    squares). A batch may hold as many items as run in half the target (at most
    ``max_batch_size``); the other half is the most the first item may wait. And it quiesces: a
    batch leaves as soon as a loop turn brings no new item, so at low load a request runs alone at
    once, while at high load the items that arrived during the previous batch fill the next one.
    """

    quiesce = True

    def __init__(self, target_latency_s: float, max_batch_size: int, decay: float = 0.9) -> None:
        self._target = target_latency_s
        self._max = max_batch_size
        self._decay = decay
        # Weighted sums for the least-squares fit of exec time against batch size.
        self._w = self._wn = self._wnn = self._wt = self._wnt = 0.0
        # (max_size, wait_s), worked out when the fit or a limit changes, not per request.
        self._limits: tuple[int, float] | None = None

    @property
    def target_latency_s(self) -> float:
        """The latency requests should meet (changeable at run time)."""
        return self._target

    @target_latency_s.setter
    def target_latency_s(self, value: float) -> None:
        self._target = value
        self._limits = None

    @property
    def max_batch_size(self) -> int:
        """The hard limit (changeable at run time)."""
        return self._max

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max = value
        self._limits = None

    def predict(self, size: int) -> float | None:
        """Predicted execution time of a batch of ``size`` items, None before any data."""
        if self._w == 0:
            return None
        fixed, per_item = self._fit()
        return fixed + per_item * size

    def _fit(self) -> tuple[float, float]:
        mean_n = self._wn / self._w
        mean_t = self._wt / self._w
        spread = self._wnn / self._w - mean_n * mean_n
        if spread > 1e-9 * max(1.0, mean_n * mean_n):
            per_item = (self._wnt / self._w - mean_n * mean_t) / spread
            if per_item > 0:
                return max(0.0, mean_t - per_item * mean_n), per_item
        # One size seen so far (or a noisy negative slope): assume cost grows with size.
        return 0.0, mean_t / max(mean_n, 1.0)

    def max_size(self) -> int:
        """Largest size whose predicted time fits half the target, within ``max_batch_size``."""
        limits = self._limits
        if limits is None:
            limits = self._limits = (self._max_size(), self._wait_s())
        return limits[0]

    def wait_s(self) -> float:
        """What is left of the target once the largest batch ran, halved: a backstop only."""
        limits = self._limits
        if limits is None:
            limits = self._limits = (self._max_size(), self._wait_s())
        return limits[1]

    def _max_size(self) -> int:
        if self._w == 0:
            return self.max_batch_size
        fixed, per_item = self._fit()
        budget = self.target_latency_s / 2 - fixed
        if per_item <= 0:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, int(budget / per_item + 1e-9)))

    def _wait_s(self) -> float:
        predicted = self.predict(self._max_size()) or 0.0
        return max(0.0, (self.target_latency_s - predicted) / 2)

    def observe(self, size: int, exec_s: float) -> None:
        """Fold one batch into the fit; older batches weigh less."""
        d = self._decay
        self._w = self._w * d + 1
        self._wn = self._wn * d + size
        self._wnn = self._wnn * d + size * size
        self._wt = self._wt * d + exec_s
        self._wnt = self._wnt * d + size * exec_s
        self._limits = None
