"""An ingress process of a namespace, for the scale-out tests.

``app`` is what ``hypercorn --workers N tests.dask.ingress:app`` serves: an App whose runtime has
a Dask backend with a namespace, both from the environment (``EMBSERVE_TEST_SCHEDULER``,
``EMBSERVE_TEST_NAMESPACE``). ``python -m tests.dask.ingress`` runs one ingress on its own:
it serves ``/echo`` on a free port, prints its URL, and shuts down when its stdin closes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import embserve
from embserve_dask import DaskBackend


@embserve.deployment(num_replicas=2, version="1", max_ongoing_requests=8)
class Echo:
    """Says which replica answered, and the pid of the Dask worker it runs under."""

    def __call__(self, request: Any = None) -> dict[str, Any]:
        return {
            "replica": embserve.get_replica_context().replica_id,
            "worker_pid": os.getppid(),
        }


def runtime() -> embserve.Runtime:
    """A runtime of the test's namespace on the test's scheduler."""
    backend = DaskBackend(os.environ.get("EMBSERVE_TEST_SCHEDULER", "tcp://127.0.0.1:8786"))
    return embserve.Runtime(backend, namespace=os.environ.get("EMBSERVE_TEST_NAMESPACE", "test"))


app = embserve.App({"/echo": Echo.bind()}, runtime=runtime())


def main() -> None:
    """One ingress: serve, say where, end when stdin closes."""
    with runtime() as rt:
        rt.run(Echo.bind(), name="Echo", route_prefix="/echo", timeout_s=60)
        server = rt.serve_http(port=0)
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
