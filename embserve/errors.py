"""The one error hierarchy of embserve.

Every error embserve raises is an :class:`EmbserveError`. User exceptions are not wrapped: an
exception raised by user code in a replica re-raises in the caller as the same type, with the
replica's traceback text attached (see :func:`remote_traceback`).
"""

from __future__ import annotations

import sys
import traceback

__all__ = [
    "BackPressureError",
    "BackendNotFoundError",
    "DeploymentFailedError",
    "DeploymentTimeoutError",
    "DeploymentUnavailableError",
    "EmbserveError",
    "HTTPError",
    "MethodNotAllowedError",
    "ReplicaDiedError",
    "RequestTimeoutError",
    "remote_traceback",
]


class EmbserveError(Exception):
    """Base class of every error raised by embserve itself."""


class BackPressureError(EmbserveError):
    """Every replica is at ``max_ongoing_requests`` and the queue holds ``max_queued_requests``.

    Retry later, add replicas, or raise ``max_queued_requests``. Over HTTP this is a 503 with a
    ``Retry-After`` header.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EmbserveError, TimeoutError):
    """A request did not finish within the deployment's ``request_timeout_s`` (HTTP 504)."""


class ReplicaDiedError(EmbserveError):
    """The replica serving a request died or was stopped before the request finished (HTTP 503).

    ``started`` tells whether the request may have reached user code. Requests that had not
    started are retried on another replica by the router; started ones are retried only when the
    deployment sets ``max_retries``.
    """

    def __init__(self, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.started = started

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_replica_died, (str(self), self.started))


def _rebuild_replica_died(message: str, started: bool) -> ReplicaDiedError:
    return ReplicaDiedError(message, started=started)


class DeploymentFailedError(EmbserveError):
    """A deployment could not start: its constructor raised, or its options cannot be met.

    ``traceback_text`` holds the user's traceback when user code failed.
    """

    def __init__(self, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{message}\n{traceback_text}" if traceback_text else message)
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[object, ...]:
        return (DeploymentFailedError, (str(self), ""))


class DeploymentTimeoutError(EmbserveError, TimeoutError):
    """``rt.run(app, timeout_s=...)`` ran out before every replica was running.

    The message names what is short (which resource, how much is free); the deployment stays
    and goes on starting, its running replicas serving meanwhile.
    """


class DeploymentUnavailableError(EmbserveError):
    """A deployment has no running replica and its last attempt to start one failed (HTTP 503).

    Requests fail at once instead of waiting; the runtime keeps retrying the start with backoff,
    and requests are served again as soon as a replica runs.
    """


class BackendNotFoundError(EmbserveError, LookupError):
    """No installed backend answers to the name or address scheme asked for."""


class HTTPError(EmbserveError):
    """Raise in a deployment to answer an HTTP request with ``status`` and ``detail``."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status}: {detail}" if detail else str(status))
        self.status = status
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return (HTTPError, (self.status, self.detail))


class MethodNotAllowedError(HTTPError):
    """The deployment chosen for an HTTP request does not answer its method (HTTP 405).

    ``allowed`` holds the methods it answers (its ``http_methods``), for the ``Allow`` header.
    """

    def __init__(self, method: str, allowed: frozenset[str]) -> None:
        super().__init__(405, f"{method} is not allowed here")
        self.allowed = allowed

    def __reduce__(self) -> tuple[object, ...]:
        return (MethodNotAllowedError, (self.detail.split(" ", 1)[0], self.allowed))


_TRACEBACK_ATTR = "__embserve_traceback__"


def attach_traceback(exc: BaseException, text: str | None = None, *, note: bool = False) -> None:
    """Record the replica-side traceback of ``exc`` so callers can read it after re-raising.

    With ``note`` (used where the exception crossed a process boundary and lost its frames), the
    text is also added as an exception note, so tracebacks printed by Python and pytest show it.
    """
    if text is None:
        text = format_traceback(exc)
    try:
        setattr(exc, _TRACEBACK_ATTR, text)
    except AttributeError:  # exceptions with __slots__: keep going without the text
        return
    if note and sys.version_info >= (3, 11):
        exc.add_note(f"\nTraceback in the replica:\n{text}")


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` as Python prints it."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def remote_traceback(exc: BaseException) -> str | None:
    """The traceback text recorded in the replica where ``exc`` was raised, if any."""
    text = getattr(exc, _TRACEBACK_ATTR, None)
    return text if isinstance(text, str) else None
