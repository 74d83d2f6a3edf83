"""embserve's Dask backend: replicas placed on a Dask cluster by Dask.

``Runtime(backend="dask://scheduler:8786")`` (or ``tls://...``, or ``DaskBackend(client)``) runs
every replica as one long-running task on a worker that has the resources it asks for; the task
hosts the replica in a process of its own (its own ``CUDA_VISIBLE_DEVICES``, its own GIL), and
requests go straight to that process over ``distributed.comm``.
"""

from embserve_dask.backend import DaskBackend
from embserve_dask.replica import DaskReplica

__all__ = ["DaskBackend", "DaskReplica"]
