"""The one request object: what every way in (handles, HTTP, shadows, calls made inside
replicas) builds, and what travels through the traffic policy, the router and the replica.

A :class:`Request` carries a call (method and arguments) and its metadata: request id, routing
key, deadline, priority, multiplexed model id and trace context. Replicas in other processes
receive it as :meth:`Request.to_wire` made it, so metadata set at the edge reaches user code on
every backend; user code reads it with :func:`get_request_context`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embserve.router import Lease

__all__ = ["Request", "RequestContext", "get_request_context", "new_request_id"]

# Request ids: a random prefix per process and a counter, so that making one costs next to
# nothing and two processes never hand out the same id.
_PREFIX = os.urandom(4).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id, unique across processes."""
    return f"{_PREFIX}{next(_counter):x}"


# The wire form: (method, args, kwargs, request_id, metadata or None). Metadata is left out
# (None) when every field has its default, which is the common case of a plain handle call.
Wire = tuple[str, tuple[Any, ...], dict[str, Any], str, "tuple[Any, ...] | None"]


@dataclasses.dataclass(slots=True, eq=False)
class Request:
    """One request, from the way in that made it to the replica that serves it.

    Attributes:
        target: the endpoint or deployment the caller addressed.
        method: the method of the deployment to call (``"__call__"`` by default).
        args, kwargs: the call's arguments.
        request_id: unique per request (an HTTP ``X-Request-Id`` when the client sent one).
            Empty until something needs it (user code asking with
            :func:`get_request_context`, a hop to another process, a log line about the
            request), which calls :meth:`ensure_id`: most in-process calls never pay for one.
        routing_key: for key-aware routers (``handle.options(routing_key=...)``).
        stream: whether the caller wants a stream of items; None lets the deployment that the
            traffic policy chose decide (a generator method streams), as HTTP does.
        deadline: when the request must be over, on the :func:`time.monotonic` clock.
        priority: higher is served first when requests wait (0 by default).
        multiplexed_model_id: the model this request is for, in multiplexed deployments.
        trace_context: the caller's trace context (W3C ``traceparent`` and friends).
        http_method: the HTTP method, for requests that came over HTTP.
        lease: the replica slot the router gave this request, while it holds one (never sent
            to another process).
    """

    target: str
    method: str = "__call__"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    request_id: str = ""
    routing_key: str | None = None
    stream: bool | None = False
    deadline: float | None = None
    priority: int = 0
    multiplexed_model_id: str = ""
    trace_context: Mapping[str, str] | None = None
    http_method: str | None = None
    lease: Lease | None = None

    def ensure_id(self) -> str:
        """The request id, assigned now if it has none yet."""
        if not self.request_id:
            self.request_id = f"{_PREFIX}{next(_counter):x}"  # new_request_id(), without a call
        return self.request_id

    def copy(self, **changes: Any) -> Request:
        """A copy of this request with a new id and no lease (for shadow copies and retries)."""
        changes.setdefault("request_id", new_request_id())
        changes.setdefault("lease", None)
        return dataclasses.replace(self, **changes)

    def timeout_left(self) -> float | None:
        """Seconds until the deadline (negative once past it), or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def to_wire(self) -> Wire:
        """The request as plain values for another process (the deadline as time left)."""
        if (
            self.routing_key is None
            and self.deadline is None
            and not self.priority
            and not self.multiplexed_model_id
            and self.trace_context is None
        ):
            meta = None
        else:
            meta = (
                self.routing_key,
                self.timeout_left(),
                self.priority,
                self.multiplexed_model_id,
                dict(self.trace_context) if self.trace_context is not None else None,
            )
        return (self.method, self.args, self.kwargs, self.request_id or self.ensure_id(), meta)

    @classmethod
    def from_wire(cls, target: str, wire: Wire) -> Request:
        """The request :meth:`to_wire` turned into plain values, on this process's clock."""
        method, args, kwargs, request_id, meta = wire
        if meta is None:
            return cls(target, method, args, kwargs, request_id)
        key, left, priority, model_id, trace = meta
        deadline = None if left is None else time.monotonic() + left
        return cls(
            target,
            method,
            args,
            kwargs,
            request_id,
            routing_key=key,
            deadline=deadline,
            priority=priority,
            multiplexed_model_id=model_id,
            trace_context=trace,
        )


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What user code can learn about the request it serves (see :func:`get_request_context`).

    Attributes:
        request_id: the request's id (an HTTP client's ``X-Request-Id`` when it sent one).
        routing_key: the routing key the caller gave, if any.
        priority: the request's priority.
        multiplexed_model_id: the model the request is for, in multiplexed deployments.
        deadline: when the request must be over (:func:`time.monotonic`), if it has a deadline.
    """

    request_id: str
    routing_key: str | None
    priority: int
    multiplexed_model_id: str
    deadline: float | None


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "embserve_request", default=None
)


def get_request_context() -> RequestContext:
    """The :class:`RequestContext` of the request the calling code serves.

    Works in async methods on the replica's loop and in sync methods in its threads, on every
    backend. Raises ``RuntimeError`` when called outside a request.
    """
    request = _current.get()
    if request is None:
        raise RuntimeError("get_request_context() called outside a request")
    return RequestContext(
        request.ensure_id(),
        request.routing_key,
        request.priority,
        request.multiplexed_model_id,
        request.deadline,
    )


#: The request the running code serves, or None (a cheap read, for the hot path).
current_request = _current.get


#: Make a request the one the running code serves (used by replica hosts); returns the token
#: for :data:`reset_current_request`. The context variable's own methods: no frame of ours.
set_current_request = _current.set
#: Undo :data:`set_current_request`.
reset_current_request = _current.reset
