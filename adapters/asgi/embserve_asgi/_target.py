"""Finding what ``embserve run module:attr`` serves, with errors a person can act on.

Every failure here is a :class:`CommandError` whose message is one plain line. When user code
raised (a module that fails while it is imported), its traceback is printed once first, from the
user's first frame: the import machinery above it is noise to the reader.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from types import ModuleType, TracebackType
from typing import Any

from embserve.deployment import Application, Deployment
from embserve.errors import EmbserveError
from embserve.runtime import Runtime
from embserve_asgi.app import App

__all__ = ["CommandError", "as_app", "load", "print_user_traceback"]

_IMPORTLIB = os.path.dirname(importlib.__file__)


class CommandError(Exception):
    """A command cannot go on; ``str()`` is the one line to print (after the command's name)."""


def load(target: str) -> Any:
    """The object named by ``module:attr`` or ``path/to/file.py:attr``."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"expected module:attr or file.py:attr, got {target!r}")
    module = _import(module_name)
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise CommandError(f"{module_name!r} has no attribute {attr!r}") from None
    return value


def _import(name: str) -> ModuleType:
    try:
        if name.endswith(".py") or os.sep in name:
            return _import_file(name)
        # Like uvicorn and hypercorn: modules of the directory the command runs in are importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except CommandError:
        raise
    except ModuleNotFoundError as exc:
        # The module asked for (or a package above it) is not there: no traceback helps. A
        # module missing further down, imported by the user's code, is the user's error.
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise CommandError(f"no module named {exc.name!r}") from None
        print_user_traceback(exc)
        raise CommandError(f"importing {name!r} failed: {_summary(exc)}") from None
    except Exception as exc:
        print_user_traceback(exc)
        raise CommandError(f"importing {name!r} failed: {_summary(exc)}") from None


def _import_file(name: str) -> ModuleType:
    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise CommandError(f"no file {name!r}")
    module_name = os.path.splitext(os.path.basename(path))[0]
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CommandError(f"{name!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _summary(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def print_user_traceback(exc: BaseException) -> None:
    """Print ``exc``'s traceback to stderr from the first frame that is not ours or importlib's."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _is_machinery(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb or exc.__traceback__)
    sys.stderr.write("".join(lines))
    sys.stderr.flush()


def _is_machinery(filename: str) -> bool:
    return (
        filename == __file__
        or filename.startswith("<frozen importlib")
        or os.path.dirname(filename) == _IMPORTLIB
    )


def as_app(
    value: Any,
    backend: str | None,
    body_timeout_s: float | None = None,
    namespace: str | None = None,
) -> App:
    """An :class:`App` for whatever ``module:attr`` named (options given override the App's)."""
    if isinstance(value, Deployment):
        value = value.bind()
    app: App
    if isinstance(value, Application):
        app = App({"/": value}, backend=backend or "local", namespace=namespace)
    elif isinstance(value, Runtime):
        if namespace is not None and namespace != value.namespace:
            raise CommandError("--namespace: a Runtime is served with its own namespace")
        app = App(runtime=value)
    elif isinstance(value, App):
        app = value
        if backend is not None or namespace is not None:
            option = "--backend" if backend is not None else "--namespace"
            try:
                app.set_backend(backend, namespace=namespace)
            except EmbserveError as exc:  # an App serving a runtime it was given
                raise CommandError(f"{option}: {exc}") from None
    else:
        raise CommandError(
            f"expected an embserve App, Application or Runtime, got {type(value).__name__}"
        )
    if body_timeout_s is not None:
        app.body_timeout_s = body_timeout_s
    return app
