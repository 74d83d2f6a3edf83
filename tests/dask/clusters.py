r"""The Dask clusters the tests start: real ``LocalCluster``\ s on 127.0.0.1 over TCP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import distributed

# distributed's constructors are untyped; tests use them through this name.
LocalCluster: Any = distributed.LocalCluster


def loopback_cluster(**shape: Any) -> Any:
    """A ``LocalCluster`` on 127.0.0.1 over TCP with no dashboard, of the given ``shape``
    (``n_workers``, ``threads_per_worker``, ``processes``, ``resources``...); use it with
    ``with``."""
    return LocalCluster(protocol="tcp", host="127.0.0.1", dashboard_address=":0", **shape)


def three_workers() -> Iterator[Any]:
    """Three worker processes (with nannies, which restart a killed worker) on 127.0.0.1, for a
    module-scoped fixture to ``yield from``."""
    with loopback_cluster(n_workers=3, threads_per_worker=1, processes=True) as local_cluster:
        yield local_cluster
