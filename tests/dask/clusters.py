"""The Dask cluster the process-killing tests share the shape of."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import distributed

# distributed's constructors are untyped; tests use them through this name.
LocalCluster: Any = distributed.LocalCluster


def three_workers() -> Iterator[Any]:
    """Three worker processes (with nannies, which restart a killed worker) on 127.0.0.1, for a
    module-scoped fixture to ``yield from``."""
    with LocalCluster(
        n_workers=3,
        threads_per_worker=1,
        processes=True,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=":0",
    ) as local_cluster:
        yield local_cluster
