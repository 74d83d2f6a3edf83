"""Handles: cheap, picklable references to an endpoint or deployment, and the registry of the
runtimes (or proxies to them) that their calls go to in this process.

A handle's call returns a :class:`~embserve.response.Response` (or a
:class:`~embserve.response.ResponseStream`); those live in :mod:`embserve.response` and are
re-exported here.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from embserve import tracing
from embserve.request import Request, current_request
from embserve.response import (
    Response,
    ResponseStream,
    has_responses,
    resolve_responses,
    start_call,
    start_threadsafe,
)

__all__ = [
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "Handle",
    "Response",
    "ResponseStream",
    "Submitter",
    "find_submitter",
    "has_responses",
    "register_submitter",
    "resolve_responses",
    "start_call",
    "start_threadsafe",
    "unregister_submitter",
]


class Submitter(Protocol):
    """What a handle needs from the runtime that serves it (a runtime, or a proxy to one)."""

    def submit(self, request: Request) -> Any:
        """Start ``request``: a :class:`ResponseStream` when ``request.stream`` is true, else a
        :class:`Response` (whose result is a :class:`ResponseStream` when ``request.stream``
        is None and the deployment chosen for it streams)."""
        ...


# Runtimes (and, in worker processes, proxies to them) by id, so unpickled handles find theirs.
_submitters: dict[str, Submitter] = {}
_lock = threading.Lock()


def register_submitter(runtime_id: str, submitter: Submitter) -> None:
    """Make handles of ``runtime_id`` call through ``submitter`` in this process."""
    with _lock:
        _submitters[runtime_id] = submitter


def unregister_submitter(runtime_id: str) -> None:
    """Forget the submitter of ``runtime_id`` (its runtime shut down)."""
    with _lock:
        _submitters.pop(runtime_id, None)


def find_submitter(runtime_id: str) -> Submitter | None:
    """The submitter registered for ``runtime_id`` in this process, if any."""
    return _submitters.get(runtime_id)


def _find_submitter(runtime_id: str) -> Submitter:
    submitter = _submitters.get(runtime_id)
    if submitter is None:
        from embserve.errors import EmbserveError

        raise EmbserveError(
            f"this handle belongs to runtime {runtime_id!r}, which is not running in this "
            "process (it shut down, or the handle was unpickled where it cannot be reached)"
        )
    return submitter


class Handle:
    """A cheap, picklable reference to an endpoint or deployment of a runtime.

    ``h.remote(*args, **kwargs)`` calls ``__call__``; ``h.method.remote(...)`` calls another
    method; ``h.options(stream=True).remote(...)`` returns a :class:`ResponseStream` for generator
    methods; ``h.options(routing_key="user-42")`` sends calls with that key, which a deployment
    with ``router="consistent_hash"`` keeps on one replica; ``h.options(priority=1)`` serves its
    calls before those of priority 0 when requests wait. Handles are safe to share between
    threads and event loops.
    """

    __slots__ = (
        "_call",
        "_key",
        "_method",
        "_model",
        "_priority",
        "_runtime_id",
        "_stream",
        "_submitter",
        "name",
    )

    def __init__(
        self,
        runtime_id: str,
        name: str,
        *,
        method: str = "__call__",
        stream: bool = False,
        routing_key: str | None = None,
        priority: int = 0,
        multiplexed_model_id: str = "",
    ) -> None:
        self._runtime_id = runtime_id
        self.name = name
        self._method = method
        self._stream = stream
        self._key = routing_key
        self._priority = priority
        self._model = multiplexed_model_id
        # What remote() reads, in one attribute: with __getattr__ on the class, each attribute
        # read of a handle takes Python's slow path (a fifth of a handle call's own cost).
        self._call = (name, method, routing_key, stream, priority, multiplexed_model_id)
        self._submitter: Submitter | None = None

    @property
    def method_name(self) -> str:
        """The method this handle calls."""
        return self._method

    def options(
        self,
        *,
        method_name: str | None = None,
        stream: bool | None = None,
        routing_key: str | None = None,
        priority: int | None = None,
        multiplexed_model_id: str | None = None,
        use_new_handle_api: bool | None = None,
    ) -> Handle:
        """A copy of this handle with some options changed (None keeps the current one).

        Args:
            method_name: the method to call.
            stream: return a :class:`ResponseStream` of a generator method's items.
            routing_key: requests with the same key stay on one replica under
                ``router="consistent_hash"``.
            priority: an int, higher served first when requests wait (default 0).
            multiplexed_model_id: the model a multiplexed deployment should serve the
                request with.
            use_new_handle_api: accepted for Ray Serve's sake; embserve has only this API.
        """
        if routing_key is not None and not isinstance(routing_key, str):
            raise TypeError(f"routing_key must be a str, got {routing_key!r}")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise TypeError(f"priority must be an int, got {priority!r}")
        if multiplexed_model_id is not None and not isinstance(multiplexed_model_id, str):
            raise TypeError(f"multiplexed_model_id must be a str, got {multiplexed_model_id!r}")
        return Handle(
            self._runtime_id,
            self.name,
            method=self._method if method_name is None else method_name,
            stream=self._stream if stream is None else stream,
            routing_key=self._key if routing_key is None else routing_key,
            priority=self._priority if priority is None else priority,
            multiplexed_model_id=self._model
            if multiplexed_model_id is None
            else multiplexed_model_id,
        )

    def __getattr__(self, method: str) -> Handle:
        if method.startswith("_"):
            raise AttributeError(method)
        return self.options(method_name=method)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Start a call; returns a :class:`Response` (a :class:`ResponseStream` when streaming).

        Responses of other calls may be passed among the arguments: the call waits for them and
        receives their results. A call made while serving a request (in a replica) inherits
        that request's deadline and trace context.
        """
        submitter = self._submitter
        if submitter is None:
            submitter = self._submitter = _find_submitter(self._runtime_id)
        name, method, key, stream, priority, model = self._call
        request = Request(name, method, args, kwargs, "", key, stream)
        if priority or model:
            request.priority = priority
            request.multiplexed_model_id = model
        parent = current_request()
        if parent is not None:
            # A call made while serving a request is part of it: same deadline, same trace.
            request.deadline = parent.deadline
            request.trace_context = parent.trace_context
        if tracing.ENABLED:
            variable = tracing.context_variable
            if variable is None or variable.get():  # else no span: nothing to capture
                context = tracing.capture()  # the caller's span (in a replica: its execution)
                if context is not None:
                    request.trace_context = context
        return submitter.submit(request)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handle,
            (
                self._runtime_id,
                self.name,
                self._method,
                self._stream,
                self._key,
                self._priority,
                self._model,
            ),
        )

    def __repr__(self) -> str:
        method = "" if self._method == "__call__" else f".{self._method}"
        return f"Handle({self.name!r}{method})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and self.__reduce__() == other.__reduce__()

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])


def _rebuild_handle(
    runtime_id: str,
    name: str,
    method: str,
    stream: bool,
    routing_key: str | None = None,
    priority: int = 0,
    multiplexed_model_id: str = "",
) -> Handle:
    return Handle(
        runtime_id,
        name,
        method=method,
        stream=stream,
        routing_key=routing_key,
        priority=priority,
        multiplexed_model_id=multiplexed_model_id,
    )


# Ray Serve's names for the same things, so code written for it reads unchanged.
DeploymentHandle = Handle
DeploymentResponse = Response
DeploymentResponseGenerator = ResponseStream
