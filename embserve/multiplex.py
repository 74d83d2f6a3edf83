"""Model multiplexing: many models served by one deployment, each replica holding a few.

Ray Serve's names: decorate an async loader ``get_model(self, model_id)`` with
:func:`multiplexed`; inside a request, :func:`get_multiplexed_model_id` says which model the
caller asked for (``handle.options(multiplexed_model_id=...)``, or the HTTP header
``embserve-model-id`` / ``serve_multiplexed_model_id``), and ``await self.get_model(model_id)``
returns it: loaded once per replica (callers asking for a model being loaded wait for that
load), the least recently used evicted beyond ``max_num_models_per_replica``.

The router sends a request to a replica that holds its model when one has room, and to
another (which then loads it) when none has: see :class:`embserve.router.Router`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, overload

from embserve.context import get_replica_context
from embserve.request import current_request

__all__ = ["get_multiplexed_model_id", "max_models_of", "model_loads", "multiplexed"]

logger = logging.getLogger("embserve.multiplex")

DEFAULT_MAX_MODELS_PER_REPLICA = 3

Loader = TypeVar("Loader", bound=Callable[..., Awaitable[Any]])


# Models loaded, by replica id (what the replica's metrics report as embserve_model_loads).
_loads: dict[str, int] = {}


def model_loads(replica_id: str) -> int:
    """How many models replica ``replica_id`` has loaded."""
    return _loads.get(replica_id, 0)


def _count_load() -> None:
    try:
        replica_id = get_replica_context().replica_id
    except RuntimeError:
        replica_id = ""
    _loads[replica_id] = _loads.get(replica_id, 0) + 1


def get_multiplexed_model_id() -> str:
    """The model id of the request the calling code serves ("" when it names none)."""
    request = current_request()
    return request.multiplexed_model_id if request is not None else ""


class _Models:
    # One replica's models, least recently used first, and the loads under way.

    __slots__ = ("limit", "loading", "models")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Future[Any]] = {}


@overload
def multiplexed(_fn: Loader, /) -> Loader: ...


@overload
def multiplexed(
    _fn: None = None, /, *, max_num_models_per_replica: int = DEFAULT_MAX_MODELS_PER_REPLICA
) -> Callable[[Loader], Loader]: ...


def multiplexed(
    _fn: Loader | None = None,
    /,
    *,
    max_num_models_per_replica: int = DEFAULT_MAX_MODELS_PER_REPLICA,
) -> Loader | Callable[[Loader], Loader]:
    """Make an async loader method ``get_model(self, model_id)`` a per-replica model cache.

    Each replica loads a model once (concurrent requests for a model being loaded wait for
    that one load) and keeps at most ``max_num_models_per_replica`` (default 3), evicting the
    least recently used; a loader that raises caches nothing and the next call tries again.
    """
    if (
        isinstance(max_num_models_per_replica, bool)
        or not isinstance(max_num_models_per_replica, int)
        or max_num_models_per_replica < 1
    ):
        raise ValueError(
            f"max_num_models_per_replica must be an int >= 1, got {max_num_models_per_replica!r}"
        )

    def wrap(fn: Loader) -> Loader:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@embserve.multiplexed needs an async method `async def {fn.__name__}(self, "
                f"model_id)`, got {fn!r}"
            )
        attr = f"_embserve_models_{fn.__name__}"

        @functools.wraps(fn)
        async def get_model(self: Any, model_id: str) -> Any:
            if not isinstance(model_id, str) or not model_id:
                raise ValueError(f"a model id is a non-empty str, got {model_id!r}")
            cache: _Models | None = self.__dict__.get(attr)
            if cache is None:
                cache = _Models(max_num_models_per_replica)
                setattr(self, attr, cache)
            return await _get(cache, fn, self, model_id)

        get_model._embserve_max_models = max_num_models_per_replica  # type: ignore[attr-defined]
        return get_model  # type: ignore[return-value]

    if _fn is not None:
        return wrap(_fn)
    return wrap


async def _get(
    cache: _Models, load: Callable[..., Awaitable[Any]], owner: Any, model_id: str
) -> Any:
    models = cache.models
    if model_id in models:
        models.move_to_end(model_id)
        return models[model_id]
    loading = cache.loading.get(model_id)
    if loading is None:
        # The load is a task of its own: a caller that gives up does not cancel it for the
        # others waiting on it, and what it loaded is kept for the next.
        loading = asyncio.ensure_future(_load(cache, load, owner, model_id))
        loading.add_done_callback(_retrieve)  # a failed load nobody waits for any more
        cache.loading[model_id] = loading
    return await asyncio.shield(loading)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _load(
    cache: _Models, load: Callable[..., Awaitable[Any]], owner: Any, model_id: str
) -> Any:
    try:
        model = await load(owner, model_id)
    finally:
        del cache.loading[model_id]
    _count_load()
    models = cache.models
    models[model_id] = model
    while len(models) > cache.limit:
        evicted, _ = models.popitem(last=False)
        logger.info("evicted model %r (max_num_models_per_replica=%d)", evicted, cache.limit)
    return model


def _loaders(target: Any) -> Iterator[int]:
    if not inspect.isclass(target):
        return
    for klass in target.__mro__:
        for value in vars(klass).values():
            limit = getattr(value, "_embserve_max_models", None)
            if isinstance(limit, int):
                yield limit


def max_models_of(target: Any) -> int:
    """How many models a replica of ``target`` keeps (0: it multiplexes none)."""
    return max(_loaders(target), default=0)
