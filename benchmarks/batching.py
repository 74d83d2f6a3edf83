"""Batching through handles on the local backend, beside the numpy floor from the same run.

    python benchmarks/batching.py [--quick] [--out FILE]

Prints one JSON object (and writes it to FILE with ``--out``). The deployment computes
``tanh(x @ W)`` for one 512-vector ``x`` per request, ``W`` a 512x512 float32 matrix. Callers
call through a handle in a closed loop, at 4, 16 and 64 callers, from three places:

- ``loop``: coroutines on the runtime's own loop (an ASGI app whose lifespan runs the runtime);
- ``foreign_loop``: coroutines on another event loop in another thread (``with Runtime()`` and
  ``asyncio.run`` elsewhere: a FastAPI view calling a runtime it does not own);
- ``threads``: plain threads blocking on ``.result()`` (a Flask view).

Variants, each measured at every load and from every place:

- ``unbatched``: an ``async def`` deployment, one matrix-vector product per request on the loop;
- ``fixed_<size>_<wait>ms``: ``@embserve.batch(max_batch_size=size, batch_wait_timeout_s=wait)``
  over an ``async def``, computing on the replica's loop (the loop callers see five settings;
  the others the headline one, ``fixed_32_10ms``);
- ``adaptive``: ``@embserve.batch(max_batch_size=64, target_latency_s=0.01)``, the same way;
- ``fixed_32_10ms_in_thread`` and ``adaptive_in_thread``: the same over a plain ``def``, which
  runs in the batcher's thread while the loop fills the next batch (faster when a second core
  is free, slower when other processes hold it: both are shown).

``floor``: the same numpy computation on ready-made batches of 32, no serving layer, measured
between the cells; its median is the floor every ratio is taken to, so both see the same machine
load and the same BLAS build and threads (reported under ``blas``). Each cell is the median of
interleaved rounds.

``no_serving_layer``: the same 64 callers with no serving layer at all (a bare asyncio queue of
futures whose batches of 32 run on the loop; from a foreign loop, one hand-over each way per
batch): what Python alone costs on this machine around the computation, so the bound any
serving layer here stays under.

Targets (issue 11): ``fixed_32_10ms`` at 64 loop callers >= 0.5x the floor and >= 1.5x
``unbatched``; at 64 foreign-loop callers >= 0.35x the floor; at every load and from every place
the best batched variant beats ``unbatched``; ``adaptive`` within 10% of the best fixed setting
on throughput at every load; a lone request after an idle period within
``batch_wait_timeout_s`` + 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where the dask benchmark would
# shadow the `dask` package itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

# One BLAS thread for every variant and the floor alike (override with the environment): on a
# small, shared machine a second BLAS thread makes each product wait for a core and the figures
# swing tenfold from run to run; and the serving loop needs the other core.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings, which numpy reads on import)

import embserve  # noqa: E402

SIZE = 512
W = (np.random.default_rng(0).standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
SIZES: list[int] = []  # batch sizes seen by the replica under test (list.append is atomic)
LOADS = (4, 16, 64)
HEADLINE = "fixed_32_10ms"


@embserve.deployment(max_ongoing_requests=64, max_queued_requests=-1)
class Unbatched:
    """One request, one matrix-vector product."""

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        SIZES.append(1)
        out: np.ndarray = np.tanh(x @ W)
        return out


def compute(xs: list[np.ndarray]) -> np.ndarray:
    """The batch: one row per input (the batcher hands row i to caller i)."""
    SIZES.append(len(xs))
    out: np.ndarray = np.tanh(np.stack(xs) @ W)
    return out


def batched(on_loop: bool = False, **options: Any) -> embserve.Deployment:
    """A deployment whose ``__call__`` is batched with ``options``: a ``def`` (in the batcher's
    thread), or with ``on_loop`` an ``async def`` (on the replica's loop)."""

    if on_loop:

        class OnLoop:
            @embserve.batch(**options)
            async def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
                return compute(xs)

        return embserve.deployment(max_queued_requests=-1)(OnLoop)

    class InThread:
        @embserve.batch(**options)
        def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
            return compute(xs)

    return embserve.deployment(max_queued_requests=-1)(InThread)


def floor(batch: int, seconds: float) -> float:
    """Items/s of ``tanh(X @ W)`` on ready-made batches, no serving layer."""
    rows = np.random.default_rng(1).standard_normal((batch, SIZE)).astype(np.float32)
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(20):
            np.tanh(rows @ W)
        done += 20
        now = time.perf_counter()
        if now >= end:
            return done * batch / (now - start)


def figures(latencies: list[float], elapsed: float) -> dict[str, float]:
    """Items/s, p50/p99 ms and mean batch size of one cell."""
    latencies.sort()
    count = len(latencies)
    return {
        "items_per_s": round(count / elapsed),
        "p50_ms": round(latencies[count // 2] * 1e3, 3),
        "p99_ms": round(latencies[int(count * 0.99)] * 1e3, 3),
        # Batches run in this process only on the local backend.
        "mean_batch_size": round(count / len(SIZES), 2) if SIZES else -1,
    }


async def async_load(handle: Any, callers: int, seconds: float) -> dict[str, float]:
    """Closed-loop coroutines on the running loop (the runtime's, or a foreign one)."""
    inputs = np.random.default_rng(2).standard_normal((callers, SIZE)).astype(np.float32)
    latencies: list[float] = []
    clock = time.perf_counter
    await asyncio.gather(*(handle.remote(inputs[i]) for i in range(callers)))  # warm up
    SIZES.clear()
    stop = clock() + seconds

    async def caller(x: np.ndarray) -> None:
        while True:
            start = clock()
            await handle.remote(x)
            end = clock()
            latencies.append(end - start)
            if end >= stop:
                return

    start = clock()
    await asyncio.gather(*(caller(inputs[i]) for i in range(callers)))
    return figures(latencies, clock() - start)


def thread_load(handle: embserve.Handle, callers: int, seconds: float) -> dict[str, float]:
    """Closed-loop plain threads, each blocking on ``.result()``."""
    inputs = np.random.default_rng(2).standard_normal((callers, SIZE)).astype(np.float32)
    clock = time.perf_counter
    per_thread: list[list[float]] = [[] for _ in range(callers)]
    ready = threading.Barrier(callers + 1)
    stop = [0.0]

    def caller(i: int) -> None:
        x, mine = inputs[i], per_thread[i]
        handle.remote(x).result(timeout_s=30)  # warm up
        ready.wait()
        ready.wait()  # the clock starts
        while True:
            start = clock()
            handle.remote(x).result(timeout_s=30)
            end = clock()
            mine.append(end - start)
            if end >= stop[0]:
                return

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    ready.wait()
    SIZES.clear()
    start = clock()
    stop[0] = start + seconds
    ready.wait()
    for thread in threads:
        thread.join()
    return figures([x for mine in per_thread for x in mine], clock() - start)


async def bare_load(callers: int, seconds: float) -> float:
    """Items/s of :class:`BareQueue` with ``callers`` closed-loop callers on this loop."""
    figures = await async_load(BareQueue(asyncio.get_running_loop()), callers, seconds)
    return figures["items_per_s"]


async def lone_request_ms(handle: embserve.Handle, repeats: int) -> float:
    """Median latency of one request after an idle period (nobody to batch with)."""
    samples = []
    x = np.ones(SIZE, dtype=np.float32)
    for _ in range(repeats):
        await asyncio.sleep(0.02)  # the idle period being measured, not a wait for state
        start = time.perf_counter()
        await handle.remote(x)
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1e3, 3)


def blas_info() -> dict[str, Any]:
    """Which BLAS numpy uses and with how many threads (threadpoolctl when installed)."""
    env = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        pools = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
        return {"source": "threadpoolctl", "pools": pools, "env": env}
    config: Any = {}
    with contextlib.suppress(TypeError):  # numpy < 1.25 prints only
        config = np.show_config(mode="dicts")
    blas = (config or {}).get("Build Dependencies", {}).get("blas", {})
    return {
        "source": "numpy.show_config and the environment",
        "name": blas.get("name"),
        "version": blas.get("version"),
        "openblas_configuration": blas.get("openblas configuration"),
        "num_threads": env["OPENBLAS_NUM_THREADS"],
        "env": env,
    }


def measure_backends(
    names: list[str],
    variants: dict[str, Any],
    which: list[str],
    seconds: float,
    rounds: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``which`` variants at 64 callers on the loop of a runtime on each backend in ``names``:
    the medians of interleaved rounds."""
    measured: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        cluster: Any = None
        backend: Any = name
        if name == "dask":
            from distributed import LocalCluster

            from embserve_dask import DaskBackend

            cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=1, threads_per_worker=2, processes=True
            )
            backend = DaskBackend(cluster.get_client())
        try:
            with embserve.Runtime(backend=backend) as runtime:
                loop = runtime.loop
                assert loop is not None
                handles = {
                    v: runtime.run(variants[v].options(name=v).bind(), name=v) for v in which
                }
                runs: dict[str, list[dict[str, float]]] = {v: [] for v in which}
                for _ in range(rounds):
                    for v, handle in handles.items():
                        runs[v].append(
                            asyncio.run_coroutine_threadsafe(
                                async_load(handle, 64, seconds), loop
                            ).result()
                        )
                measured[name] = {
                    v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                    for v, rs in runs.items()
                }
        finally:
            if cluster is not None:
                cluster.close()
    return measured


class BareQueue:
    """No serving layer at all: the callers' items queue for batches of 32 that run on ``loop``
    (:meth:`remote`: callers on that loop; :meth:`from_loop`: a stand-in handle for callers on
    another loop, one hand-over each way per batch; one queue serves one kind). What the same
    callers reach with asyncio alone: the bound any serving layer on this machine stays under."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: list[tuple[np.ndarray, asyncio.Future[Any]]] = []
        self.scheduled = False
        self.arrived: list[tuple[np.ndarray, asyncio.Future[Any]]] = []  # from other loops
        self.lock = threading.Lock()

    def remote(self, x: np.ndarray) -> asyncio.Future[Any]:
        """On ``loop``: queue ``x``; the future of its row."""
        future = self.loop.create_future()
        self.waiting.append((x, future))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)
        return future

    def run(self) -> None:
        self.scheduled = False
        with self.lock:
            self.waiting += self.arrived
            self.arrived = []
        while self.waiting:
            batch, self.waiting = self.waiting[:32], self.waiting[32:]
            rows = compute([x for x, _ in batch])
            answers = [(future, row) for (_, future), row in zip(batch, rows)]  # noqa: B905
            loop = answers[0][0].get_loop()
            if loop is self.loop:
                settle_rows(answers)
            else:
                loop.call_soon_threadsafe(settle_rows, answers)

    def from_loop(self) -> Any:
        """A stand-in for a handle, for callers on another loop."""
        bare = self

        class Caller:
            def remote(self, x: np.ndarray) -> asyncio.Future[Any]:
                future = asyncio.get_running_loop().create_future()
                with bare.lock:
                    bare.arrived.append((x, future))
                    wake = not bare.scheduled
                    bare.scheduled = True
                if wake:
                    bare.loop.call_soon_threadsafe(bare.run)
                return future

        return Caller()


def settle_rows(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """Each future its row."""
    for future, row in answers:
        future.set_result(row)


class ForeignLoop:
    """An event loop in a thread of its own that is not the runtime's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument(
        "--backends",
        default="process",
        help="other backends to measure at 64 loop callers, comma-separated: process, dask "
        "(a LocalCluster of one worker), or none (default: process)",
    )
    options = parser.parse_args()
    seconds = 0.1 if options.quick else 0.6
    # Cells are measured in interleaved rounds and each figure is the median of its rounds, so
    # that a burst of load from elsewhere on the machine hits one round, not one variant.
    rounds = 1 if options.quick else 3
    fixed = [(8, 0.001), (32, 0.001), (32, 0.01), (64, 0.001), (64, 0.01)]
    variants: dict[str, Any] = {"unbatched": Unbatched}
    for size, wait in fixed:
        variants[f"fixed_{size}_{wait * 1e3:g}ms"] = batched(
            on_loop=True, max_batch_size=size, batch_wait_timeout_s=wait
        )
    variants["adaptive"] = batched(on_loop=True, max_batch_size=64, target_latency_s=0.01)
    variants["fixed_32_10ms_in_thread"] = batched(max_batch_size=32, batch_wait_timeout_s=0.01)
    variants["adaptive_in_thread"] = batched(max_batch_size=64, target_latency_s=0.01)
    # What foreign-loop and thread callers, and the other backends, see.
    elsewhere = ["unbatched", HEADLINE, "fixed_32_10ms_in_thread", "adaptive"]
    places = {"loop": list(variants), "foreign_loop": elsewhere, "threads": elsewhere}
    gc.freeze()

    floors: list[float] = [floor(32, seconds)]
    samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        place: {str(n): {name: [] for name in names} for n in LOADS}
        for place, names in places.items()
    }
    foreign = ForeignLoop()
    with embserve.Runtime() as runtime:
        loop = runtime.loop
        assert loop is not None
        handles = {
            name: runtime.run(dep.options(name=name).bind(), name=name)
            for name, dep in variants.items()
        }
        runners: dict[str, Callable[[embserve.Handle, int], dict[str, float]]] = {
            "loop": lambda h, n: asyncio.run_coroutine_threadsafe(
                async_load(h, n, seconds), loop
            ).result(),
            "foreign_loop": lambda h, n: foreign.run(async_load(h, n, seconds)),
            "threads": lambda h, n: thread_load(h, n, seconds),
        }
        for _ in range(rounds):
            for callers in LOADS:
                for place, names in places.items():
                    for name in names:
                        measured = runners[place](handles[name], callers)
                        samples[place][str(callers)][name].append(measured)
                    floors.append(floor(32, seconds / 2))
        backends = measure_backends(
            [b for b in options.backends.split(",") if b and b != "none"],
            variants,
            elsewhere,
            seconds,
            rounds,
        )
        # The bound with no serving layer, at 64 callers, where the headline is measured.
        bare_runs: dict[str, list[float]] = {"loop": [], "foreign_loop": []}
        for _ in range(rounds):
            bare_runs["loop"].append(
                asyncio.run_coroutine_threadsafe(bare_load(64, seconds), loop).result()
            )
            bare = BareQueue(loop)
            bare_runs["foreign_loop"].append(
                foreign.run(async_load(bare.from_loop(), 64, seconds))["items_per_s"]
            )
        repeats = 5 if options.quick else 20
        lone = {
            name: asyncio.run_coroutine_threadsafe(
                lone_request_ms(handles[name], repeats), loop
            ).result()
            for name in (HEADLINE, "adaptive")
        }
    foreign.close()

    floor_rate = statistics.median(floors)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for place, per_load in samples.items():
        results[place] = {}
        for load, per_variant in per_load.items():
            cells = results[place][load] = {}
            for name, runs in per_variant.items():
                cell = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                cell["ratio_to_floor"] = round(cell["items_per_s"] / floor_rate, 3)
                cells[name] = cell
            unbatched = cells["unbatched"]["items_per_s"]
            for cell in cells.values():
                cell["ratio_to_unbatched"] = round(cell["items_per_s"] / unbatched, 3)

    adaptive_vs_best: dict[str, dict[str, dict[str, float]]] = {}
    for place in ("loop",):
        adaptive_vs_best[place] = {}
        for load, cells in results[place].items():
            fixed_only = {
                k: v for k, v in cells.items() if k.startswith("fixed") and "thread" not in k
            }
            best = max(fixed_only, key=lambda k: fixed_only[k]["items_per_s"])
            adaptive_vs_best[place][load] = {
                "best_fixed": best,  # type: ignore[dict-item]
                "throughput_ratio": round(
                    cells["adaptive"]["items_per_s"] / fixed_only[best]["items_per_s"], 3
                ),
                "p99_ratio": round(
                    cells["adaptive"]["p99_ms"] / min(v["p99_ms"] for v in fixed_only.values()), 3
                ),
                "in_thread_throughput_ratio": round(
                    cells["adaptive_in_thread"]["items_per_s"]
                    / cells["fixed_32_10ms_in_thread"]["items_per_s"],
                    3,
                ),
            }

    head = results["loop"]["64"][HEADLINE]
    head_foreign = results["foreign_loop"]["64"][HEADLINE]
    report: dict[str, Any] = {
        "benchmark": "batching",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": blas_info(),
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "floor": "numpy tanh(X @ W) on ready batches of 32, no serving layer",
        "floor_items_per_s": round(floor_rate),
        "floor_spread": [round(min(floors)), round(max(floors))],
        "headline": {
            "loop_64_ratio_to_floor": head["ratio_to_floor"],
            "loop_64_ratio_to_unbatched": head["ratio_to_unbatched"],
            "foreign_loop_64_ratio_to_floor": head_foreign["ratio_to_floor"],
            "threads_64_ratio_to_floor": results["threads"]["64"][HEADLINE]["ratio_to_floor"],
        },
        "callers": results,
        "backends": {
            name: {
                variant: {
                    **cell,
                    "ratio_to_floor": round(cell["items_per_s"] / floor_rate, 3),
                    "ratio_to_unbatched": round(
                        cell["items_per_s"] / cells["unbatched"]["items_per_s"], 3
                    ),
                }
                for variant, cell in cells.items()
            }
            for name, cells in backends.items()
        },
        "no_serving_layer": {
            place: {
                "items_per_s": round(statistics.median(runs)),
                "ratio_to_floor": round(statistics.median(runs) / floor_rate, 3),
            }
            for place, runs in bare_runs.items()
        },
        "adaptive_vs_best_fixed": adaptive_vs_best,
        "lone_request_ms": lone,
    }
    report["targets"] = {
        "loop_64_ge_0.5x_floor": head["ratio_to_floor"] >= 0.5,
        "loop_64_ge_1.5x_unbatched": head["ratio_to_unbatched"] >= 1.5,
        "foreign_loop_64_ge_0.35x_floor": head_foreign["ratio_to_floor"] >= 0.35,
        "batched_beats_unbatched_at_64_from_every_place_and_backend": all(
            max(v["items_per_s"] for k, v in cells.items() if k != "unbatched")
            > cells["unbatched"]["items_per_s"]
            for cells in [*(results[place]["64"] for place in places), *backends.values()]
        ),
        "adaptive_within_10pct_of_best_fixed_throughput": all(
            v["throughput_ratio"] >= 0.9 for v in adaptive_vs_best["loop"].values()
        ),
        "lone_request_le_wait_plus_2ms": lone[HEADLINE] <= 10 + 2,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if options.out:
        Path(options.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
