"""The embserve pytest plugin: a local runtime per test, stopped when the test ends.

Installed with embserve (entry point ``pytest11``). Use the ``embserve_runtime`` fixture::

    def test_model(embserve_runtime):
        handle = embserve_runtime.run(Model.bind())
        assert handle.remote(1).result(timeout_s=1) == 2
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from embserve.runtime import Runtime

__all__ = ["embserve_runtime"]


@pytest.fixture
def embserve_runtime() -> Iterator[Runtime]:
    """A started local :class:`~embserve.Runtime`, shut down after the test."""
    with Runtime(backend="local", seed=0) as runtime:
        yield runtime
