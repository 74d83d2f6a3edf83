"""embserve's process backend: each replica in a local worker process of its own.

``Runtime(backend="process")`` or ``Runtime(backend=ProcessBackend(resources={"GPU": 2}))``.
"""

from embserve_process._backend import ProcessBackend
from embserve_process._replica import ProcessReplica

__all__ = ["ProcessBackend", "ProcessReplica"]
