"""Replicas on a Dask cluster sharing GPUs: ``resources={"GPU": 0.5}`` puts two on one device.

``python examples/dask_gpus.py`` starts a ``LocalCluster`` of two workers that each declare one
GPU (``resources={"GPU": 1}``), so it runs on a machine without any GPU: embserve places the
replicas by the declared resources and gives each process the device it holds in
``CUDA_VISIBLE_DEVICES``. On a real cluster, start the workers with
``dask worker tcp://scheduler:8786 --resources "GPU=1"`` (one per GPU, each with its own
``CUDA_VISIBLE_DEVICES``; dask-cuda does this) and pass ``--scheduler tcp://scheduler:8786``.

It prints where each replica runs, the answers of a few calls, and the status of a fifth replica
that waits for a free share.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import embserve


@embserve.deployment(num_replicas=4, resources={"GPU": 0.5})
class Embedder:
    """A model on half a GPU (here numpy stands in for the GPU work)."""

    def __init__(self, dim: int) -> None:
        self.weights = np.random.default_rng(0).normal(size=(dim, 4)).astype(np.float32)
        # A torch model would go to "cuda:0": the first (and only) device this process sees.
        self.device = os.environ.get("CUDA_VISIBLE_DEVICES", "")

    @embserve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def __call__(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.tanh(np.stack(rows) @ self.weights)

    def where(self) -> dict[str, object]:
        """This replica's id, process and device."""
        context = embserve.get_replica_context()
        return {"replica": context.replica_id, "pid": os.getpid(), "gpu": self.device}


def show(runtime: embserve.Runtime) -> None:
    """Deploy, print the placement and a few answers, and show a replica that must wait."""
    handle = runtime.run(Embedder.bind(8), name="embedder")
    for replica in sorted(
        runtime.status().deployments["embedder"].replicas, key=lambda r: r.replica_id
    ):
        info = replica.info
        print(
            f"{replica.replica_id}: worker {info['worker_name']}, GPU {info['gpu_ids']}, "
            f"holds {info['resources']}",
            flush=True,
        )
    rows = [handle.remote(np.ones(8, np.float32)) for _ in range(8)]
    print("8 answers of shape", {r.result(timeout_s=10).shape for r in rows}, flush=True)
    # Every share is taken: a fifth replica waits, and its status says why.
    runtime.run(Embedder.options(num_replicas=1).bind(8), name="one-more", wait=False)
    deadline = time.monotonic() + 30
    message = ""
    while "waiting" not in message and time.monotonic() < deadline:
        time.sleep(0.05)
        message = runtime.status().deployments["one-more"].message
    print("one-more:", message, flush=True)


def main() -> None:
    """Run on a LocalCluster declaring GPUs, or on the cluster ``--scheduler`` names."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", help="a running cluster's address (tcp://host:8786)")
    args = parser.parse_args()
    if args.scheduler:
        with embserve.Runtime(backend=args.scheduler) as runtime:
            show(runtime)
        return
    from distributed import LocalCluster

    from embserve_dask import DaskBackend

    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2,
            threads_per_worker=2,
            processes=False,
            resources={"GPU": 1},
            dashboard_address=":0",
        ) as cluster,
        embserve.Runtime(backend=DaskBackend(cluster)) as runtime,
    ):
        show(runtime)


if __name__ == "__main__":
    main()
