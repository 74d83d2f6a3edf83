"""The backend registry: names and addresses resolve through entry points, clear errors."""

from __future__ import annotations

import pytest

import embserve
from embserve import backends
from embserve.local import LocalBackend


def test_local_is_the_default() -> None:
    assert isinstance(backends.resolve_backend(None), LocalBackend)
    assert isinstance(backends.resolve_backend("local"), LocalBackend)
    given = LocalBackend()
    assert backends.resolve_backend(given) is given
    assert backends.LocalBackend is LocalBackend


def test_unknown_backend_names_what_is_installed() -> None:
    with pytest.raises(embserve.BackendNotFoundError, match="no embserve backend named 'k8s'"):
        backends.resolve_backend("k8s://cluster")
    with pytest.raises(embserve.BackendNotFoundError, match=r"installed: .*local"):
        embserve.Runtime(backend="k8s").start()


def test_missing_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine where only the core is installed (from this checkout: the folder to
    # install is named; tests/test_install.py checks the message of an installed wheel).
    monkeypatch.setattr(backends, "_entry_points", dict)
    with pytest.raises(embserve.BackendNotFoundError, match=r"pip install /.*/backends/dask`"):
        backends.resolve_backend("dask://127.0.0.1:8786")
    with pytest.raises(embserve.BackendNotFoundError, match=r"pip install /.*/backends/process`"):
        backends.ProcessBackend  # noqa: B018


def test_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="backend must be"):
        backends.resolve_backend(42)  # type: ignore[arg-type]
