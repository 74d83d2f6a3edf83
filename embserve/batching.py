"""The Batcher seam: single requests in, batches to user code, single answers out.

:func:`batch` turns a function of a list into one that callers call with a single item.
Behind it, one :class:`DynamicBatcher` per replica (created on the replica's first call, on the
loop the replica runs on, so it works on every backend) groups waiting items and sends a batch when
``max_batch_size`` worth of items wait or when the *first* waiting item has waited
``batch_wait_timeout_s``. Nothing polls: an arrival, a timer set for the first waiting item, or a
finished batch is what moves items along.

With ``target_latency_s`` the fixed limits give way to an :class:`AdaptivePolicy`, which learns
what a batch of ``n`` items costs and sends a batch as soon as no more items are on their way, so
that a lone request does not wait for company and batches fill when the replica is busy.

This module is the public face: the :class:`Batcher` contract lives in ``_batch_contract``, the
clock, metrics and policies in ``_batch_policy``, the batcher itself in ``_batcher``, and all of
them are imported from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from typing import Any, Protocol, overload

from embserve._batch_contract import Batcher
from embserve._batch_policy import (
    AdaptivePolicy,
    BatchMetrics,
    BatchPolicy,
    Clock,
    FixedPolicy,
)
from embserve._batch_policy import LoopClock as LoopClock
from embserve._batch_policy import Timer as Timer
from embserve._batcher import DynamicBatcher, live_batchers
from embserve.context import get_replica_context
from embserve.metrics import Histogram

__all__ = [
    "AdaptivePolicy",
    "BatchMetrics",
    "BatchPolicy",
    "BatchedFunction",
    "Batcher",
    "Clock",
    "DynamicBatcher",
    "FixedPolicy",
    "batch",
    "batch_capacity",
    "batch_sizes",
    "batcher_of",
    "batchers_of",
    "close_batchers",
    "live_batchers",
]

logger = logging.getLogger("embserve.batching")

DEFAULT_MAX_BATCH_SIZE = 10
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01

# --------------------------------------------------------------------------- the decorator


@dataclasses.dataclass(eq=False)
class _Limits:
    """One replica's limits; shared with its batcher so setters take effect at once."""

    max_batch_size: int
    batch_wait_timeout_s: float
    batchers: weakref.WeakSet[DynamicBatcher] = dataclasses.field(default_factory=weakref.WeakSet)


@dataclasses.dataclass(eq=False)
class BatchSettings:
    """What :func:`batch` was given; read by deployment validation (:func:`batch_capacity`)."""

    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None
    bucket_key: Callable[[Any], Hashable] | None
    target_latency_s: float | None
    # Limits per replica (by replica id; "" outside replicas), changed by the setters.
    limits: dict[str, _Limits] = dataclasses.field(default_factory=dict)

    def limits_for(self, key: str) -> _Limits:
        """The current limits of one replica (setters change them per replica)."""
        found = self.limits.get(key)
        if found is None:
            found = self.limits[key] = _Limits(self.max_batch_size, self.batch_wait_timeout_s)
        return found

    def __getstate__(self) -> dict[str, Any]:
        # Run-time limits belong to this process's replicas; a copy sent to a worker starts clean.
        state = dict(self.__dict__)
        state["limits"] = {}
        return state


# Every batcher made for a replica, by replica id, so that the replica's host closes them when
# it stops (see close_batchers).
_replica_batchers: dict[str, weakref.WeakSet[Batcher[Any, Any]]] = {}


def close_batchers(replica_id: str) -> list[asyncio.Future[None]]:
    """Close the batchers of the replica ``replica_id`` (its host calls this when it stops).

    Waiting items fail as the closes start, on the running loop; the returned futures end when
    the running batches did.
    """
    batchers = _replica_batchers.pop(replica_id, None)
    if not batchers:
        return []
    return [asyncio.ensure_future(b.close()) for b in list(batchers) if not b.closed]


def batchers_of(replica_id: str) -> list[Batcher[Any, Any]]:
    """The batchers made for replica ``replica_id`` and not closed yet."""
    return [b for b in list(_replica_batchers.get(replica_id, ())) if not b.closed]


def batch_sizes(replica_id: str) -> dict[str, dict[int, int]]:
    """How many batches of each size the batchers of replica ``replica_id`` ran, by method."""
    sizes: dict[str, dict[int, int]] = {}
    for batcher in list(_replica_batchers.get(replica_id, ())):
        metrics = getattr(batcher, "metrics", None)
        if isinstance(metrics, BatchMetrics):
            name = getattr(batcher, "name", "batched").rsplit(".", 1)[-1]
            merged = sizes.setdefault(name, {})
            for size, count in metrics.batch_sizes.items():
                merged[size] = merged.get(size, 0) + count
    return sizes


def _keep_replica_batcher(replica_id: str, batcher: Batcher[Any, Any]) -> None:
    _replica_batchers.setdefault(replica_id, weakref.WeakSet()).add(batcher)


def _replica_key() -> str:
    try:
        return get_replica_context().replica_id
    except RuntimeError:
        return ""


# Batchers of batched plain functions, by function and replica (methods keep theirs on self).
_function_batchers: weakref.WeakKeyDictionary[BatchSettings, dict[str, Batcher[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


# The nested functions of _wrap call these instead of touching the dictionary: cloudpickle sends
# nested functions by value with the globals they name, and a weak dictionary does not pickle.
def _function_batcher(settings: BatchSettings, key: str) -> Batcher[Any, Any] | None:
    return _function_batchers.get(settings, {}).get(key)


def _keep_function_batcher(settings: BatchSettings, key: str, batcher: Batcher[Any, Any]) -> None:
    _function_batchers.setdefault(settings, {})[key] = batcher


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_seconds(name: str, value: object, *, zero: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {value}")


class BatchedFunction(Protocol):
    """What :func:`batch` returns: called with one item, plus this replica's limit setters."""

    def __call__(self, *args: Any) -> Any:
        """Submit one item (after ``self`` for methods) and return or stream its result."""
        ...

    def set_max_batch_size(self, value: int) -> None:
        """Change this replica's ``max_batch_size``."""
        ...

    def set_batch_wait_timeout_s(self, value: float) -> None:
        """Change this replica's ``batch_wait_timeout_s``."""
        ...


@overload
def batch(_fn: Callable[..., Any], /) -> BatchedFunction: ...


@overload
def batch(
    _fn: None = None,
    /,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
    bucket_key: Callable[[Any], Hashable] | None = None,
    target_latency_s: float | None = None,
) -> Callable[[Callable[..., Any]], BatchedFunction]: ...


def batch(
    _fn: Callable[..., Any] | None = None,
    /,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
    bucket_key: Callable[[Any], Hashable] | None = None,
    target_latency_s: float | None = None,
) -> BatchedFunction | Callable[[Callable[..., Any]], BatchedFunction]:
    """Let callers send one item at a time to a function that works on lists.

    The decorated ``def f(self, items: list) -> list`` (method) or ``def f(items)`` (function),
    ``async def`` or not, is called with up to ``max_batch_size`` items and returns one result
    per item, in order; callers call it with one item and get their own result. An async
    generator is batched the same way: each ``yield`` is a list with one output per item, and
    each caller streams its own outputs (call it through ``handle.options(stream=True)``);
    ``StopIteration`` in an item's place ends that item's stream while the others go on.

    Args:
        max_batch_size: largest batch (in items, or in ``batch_size_fn`` units). Default 10.
        batch_wait_timeout_s: how long the first waiting item waits for company before its batch
            leaves, however small. Default 0.01 (10 ms).
        max_concurrent_batches: batches of this function running at once on one replica.
        batch_size_fn: size of a list of items (rows, tokens), as in Ray Serve, instead of
            its length, so requests that are themselves batches cannot overflow
            ``max_batch_size``; a single item whose own size is larger fails with
            ``ValueError``.
        bucket_key: function of an item; only items with equal keys (shape, model id) share a
            batch.
        target_latency_s: use the :class:`AdaptivePolicy` instead of a fixed wait: it measures
            batch times, sizes batches to fit half this latency (at most ``max_batch_size``) and
            sends a batch as soon as no more items are on their way.

    A plain ``def`` runs in a thread of the batcher's own, so that the replica's loop fills the
    next batch while one computes; an ``async def`` runs on the replica's loop.

    The deployment is validated so that a replica admits at least
    ``max_batch_size * max_concurrent_batches`` requests (``max_ongoing_requests`` defaults to
    twice that, and a smaller given value is a ``ValueError``). From ``reconfigure``, call
    ``self.method.set_max_batch_size(n)`` or ``self.method.set_batch_wait_timeout_s(s)`` to change
    this replica's limits.
    """
    _check_positive_int("max_batch_size", max_batch_size)
    _check_positive_int("max_concurrent_batches", max_concurrent_batches)
    _check_seconds("batch_wait_timeout_s", batch_wait_timeout_s, zero=True)
    if target_latency_s is not None:
        _check_seconds("target_latency_s", target_latency_s, zero=False)
    for name, value in (("batch_size_fn", batch_size_fn), ("bucket_key", bucket_key)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable, got {value!r}")
    settings = BatchSettings(
        max_batch_size,
        float(batch_wait_timeout_s),
        max_concurrent_batches,
        batch_size_fn,
        bucket_key,
        None if target_latency_s is None else float(target_latency_s),
    )

    def wrap(fn: Callable[..., Any]) -> BatchedFunction:
        return _wrap(fn, settings)

    if _fn is not None:
        return wrap(_fn)
    return wrap


def _wrap(fn: Callable[..., Any], settings: BatchSettings) -> BatchedFunction:
    streaming = inspect.isasyncgenfunction(fn)
    in_thread = not streaming and not inspect.iscoroutinefunction(fn)
    if in_thread and (inspect.isgeneratorfunction(fn) or not callable(fn)):
        raise TypeError(
            f"@embserve.batch needs a function, async function or async generator, got {fn!r}; "
            "a streaming batch must be an `async def` generator"
        )
    name = getattr(fn, "__qualname__", repr(fn))
    attr = f"_embserve_batcher_{getattr(fn, '__name__', 'fn')}"

    def make(call: Callable[[list[Any]], Any], key: str) -> Batcher[Any, Any]:
        limits = settings.limits_for(key)
        policy: BatchPolicy
        if settings.target_latency_s is not None:
            policy = AdaptivePolicy(settings.target_latency_s, limits.max_batch_size)
        else:
            policy = FixedPolicy(limits.max_batch_size, limits.batch_wait_timeout_s)
        batcher = DynamicBatcher(
            call,
            policy,
            max_concurrent_batches=settings.max_concurrent_batches,
            batch_size_fn=settings.batch_size_fn,
            bucket_key=settings.bucket_key,
            streaming=streaming,
            in_thread=in_thread,
            name=name,
        )
        limits.batchers.add(batcher)
        _keep_replica_batcher(key, batcher)
        return batcher

    def batcher_for(args: tuple[Any, ...]) -> tuple[Batcher[Any, Any], Any]:
        loop = asyncio.get_running_loop()
        if len(args) == 2:  # a method: the batcher lives and dies with the user object
            owner, item = args
            found = owner.__dict__.get(attr)
            if found is None or found.loop is not loop or found.closed:
                found = make(functools.partial(fn, owner), _replica_key())
                setattr(owner, attr, found)
            return found, item
        if len(args) != 1:
            raise TypeError(f"{name} is batched: call it with exactly one input")
        key = _replica_key()
        found = _function_batcher(settings, key)
        if found is None or found.loop is not loop or found.closed:
            found = make(fn, key)
            _keep_function_batcher(settings, key, found)
        return found, args[0]

    if streaming:

        @functools.wraps(fn)
        async def stream_wrapper(*args: Any) -> AsyncIterator[Any]:
            batcher, item = batcher_for(args)
            async for output in batcher.submit_stream(item):
                yield output

        wrapper: Any = stream_wrapper
    else:

        @functools.wraps(fn)
        async def call_wrapper(*args: Any) -> Any:
            batcher, item = batcher_for(args)
            return await batcher.submit(item)

        wrapper = call_wrapper

    def sending_batcher(owner: Any, execution: Histogram) -> DynamicBatcher:
        # The replica host's way in (see batcher_of): it queues items with batcher.send.
        batcher, _ = batcher_for((None,) if owner is None else (owner, None))
        assert isinstance(batcher, DynamicBatcher)
        if batcher.execution is None:
            batcher.execution = execution
        return batcher

    def set_max_batch_size(value: int) -> None:
        """Change this replica's ``max_batch_size`` (call from ``reconfigure``)."""
        _check_positive_int("max_batch_size", value)
        limits = settings.limits_for(_replica_key())
        limits.max_batch_size = value
        for batcher in list(limits.batchers):
            policy = batcher.policy
            if isinstance(policy, (FixedPolicy, AdaptivePolicy)):
                policy.max_batch_size = value
            batcher.limits_changed()

    def set_batch_wait_timeout_s(value: float) -> None:
        """Change this replica's ``batch_wait_timeout_s`` (call from ``reconfigure``)."""
        _check_seconds("batch_wait_timeout_s", value, zero=True)
        limits = settings.limits_for(_replica_key())
        limits.batch_wait_timeout_s = float(value)
        for batcher in list(limits.batchers):
            if isinstance(batcher.policy, FixedPolicy):
                batcher.policy.batch_wait_timeout_s = float(value)
            batcher.limits_changed()

    wrapper.set_max_batch_size = set_max_batch_size
    wrapper.set_batch_wait_timeout_s = set_batch_wait_timeout_s
    wrapper._embserve_batch = settings
    if not streaming:
        wrapper._embserve_batcher = sending_batcher
    return wrapper  # type: ignore[no-any-return]


def batcher_of(method: Callable[..., Any], execution: Histogram) -> DynamicBatcher | None:
    """The batcher behind a (bound) method or function made by :func:`batch` (made now if need
    be, for the replica whose context is current), or None for anything else and for
    streaming batches; items it gets through :meth:`DynamicBatcher.send` have their time to
    an answer recorded in ``execution``. What replica hosts use to skip a coroutine per
    request. Call it on the replica's loop."""
    target = getattr(method, "__func__", method)
    make = getattr(target, "_embserve_batcher", None)
    if make is None:
        return None
    batcher: DynamicBatcher = make(getattr(method, "__self__", None), execution)
    return batcher


def _batched_callables(target: Any) -> Iterator[tuple[str, BatchSettings]]:
    if inspect.isclass(target):
        seen: set[str] = set()
        for klass in target.__mro__:
            for attr, value in vars(klass).items():
                if attr in seen:
                    continue
                seen.add(attr)
                settings = getattr(value, "_embserve_batch", None)
                if isinstance(settings, BatchSettings):
                    yield f"{target.__name__}.{attr}", settings
    else:
        settings = getattr(target, "_embserve_batch", None)
        if isinstance(settings, BatchSettings):
            yield getattr(target, "__qualname__", "function"), settings


def batch_capacity(target: Any) -> tuple[int, str]:
    """The requests a replica of ``target`` must admit for its batches to fill, and why.

    Returns ``(0, "")`` when ``target`` has no batched method; otherwise the largest
    ``max_batch_size * max_concurrent_batches`` among them and a phrase naming that method.
    """
    best, why = 0, ""
    for where, settings in _batched_callables(target):
        need = settings.max_batch_size * settings.max_concurrent_batches
        if need > best:
            best = need
            why = (
                f"{where} is batched with max_batch_size={settings.max_batch_size} x "
                f"max_concurrent_batches={settings.max_concurrent_batches}"
            )
    return best, why
