"""The same application, unchanged, on every backend: in this process, in worker processes, and
on a Dask cluster (an in-process LocalCluster over loopback TCP)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

import embserve
from tests.dask.clusters import loopback_cluster
from tests.waiting import wait_for


@embserve.deployment(router="consistent_hash")
class Tokenizer:
    def __call__(self, text: str) -> list[str]:
        return text.split()

    def split_stream(self, text: str) -> Iterator[str]:
        yield from text.split()

    def deadline(self) -> float | None:
        return embserve.get_request_context().deadline


@embserve.deployment(num_replicas=2, max_ongoing_requests=8)
class Model:
    def __init__(self, tokenizer: embserve.Handle, weight: int) -> None:
        self.tokenizer = tokenizer
        self.weight = weight

    async def __call__(self, text: str) -> int:
        return len(await self.tokenizer.remote(text)) * self.weight

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def batched(self, xs: list[int]) -> list[int]:
        return [x * self.weight for x in xs]

    async def keyed(self, text: str) -> list[str]:
        # A routing key travels with calls made from inside a replica, too.
        tokens: list[str] = await self.tokenizer.options(routing_key=text).remote(text)
        stream = self.tokenizer.options(routing_key=text, stream=True).split_stream.remote(text)
        return tokens + [word async for word in stream]

    async def words(self, text: str) -> AsyncIterator[str]:
        for word in await self.tokenizer.remote(text):
            yield word

    def who(self) -> str:
        return embserve.get_replica_context().deployment

    async def trace_id(self) -> int:
        from opentelemetry import trace

        return int(trace.get_current_span().get_span_context().trace_id)

    async def context(self) -> tuple[str, str | None]:
        request = embserve.get_request_context()
        return request.request_id, request.routing_key

    def fail(self, message: str) -> None:
        raise KeyError(message)

    async def in_a_task(self) -> bool:
        # asyncio.timeout, anyio cancel scopes (and so httpx) need a task, from the first step.
        with anyio.fail_after(5):
            await asyncio.sleep(0)
        return asyncio.current_task() is not None


@embserve.deployment
class Blocking:
    """Sync user code that blocks its thread on a FIFO until the test writes to it."""

    def read(self, fifo: str) -> str:
        with open(fifo) as pipe:  # opening blocks until the test opens the other end
            return pipe.read()

    def ping(self) -> str:
        return "pong"


@embserve.deployment(num_replicas=2)
class Models:
    def __init__(self) -> None:
        self.loads: dict[str, int] = {}

    @embserve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        return model_id

    async def __call__(self) -> tuple[str, int]:
        model_id = embserve.get_multiplexed_model_id()
        await self.get_model(model_id)
        return embserve.get_replica_context().replica_id, self.loads[model_id]


@embserve.deployment(request_timeout_s=60)
class Timed:
    def __init__(self, tokenizer: embserve.Handle) -> None:
        self.tokenizer = tokenizer

    async def __call__(self) -> tuple[float | None, float | None]:
        return embserve.get_request_context().deadline, await self.tokenizer.deadline.remote()


@pytest.fixture(scope="module", params=["local", "process", "dask"])
def runtime(request: pytest.FixtureRequest) -> Iterator[embserve.Runtime]:
    if request.param != "dask":
        with embserve.Runtime(backend=request.param) as rt:
            yield rt
        return
    cluster = loopback_cluster(n_workers=1, processes=False)
    address = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
    with cluster, embserve.Runtime(backend=address) as rt:
        yield rt


@pytest.fixture(scope="module")
def model(runtime: embserve.Runtime) -> embserve.Handle:
    return runtime.run(Model.bind(Tokenizer.bind(), 10), name="model")


def test_calls_and_composition(model: embserve.Handle) -> None:
    assert model.remote("a b c").result(timeout_s=30) == 30
    assert model.who.remote().result(timeout_s=30) == "model"


def test_routing_keys_from_inside_a_replica(model: embserve.Handle) -> None:
    assert model.keyed.remote("p q").result(timeout_s=30) == ["p", "q", "p", "q"]


def test_batched_calls(model: embserve.Handle) -> None:
    responses = [model.batched.remote(i) for i in range(10)]
    assert [r.result(timeout_s=30) for r in responses] == [10 * i for i in range(10)]


def test_streams(model: embserve.Handle) -> None:
    assert list(model.options(stream=True).words.remote("x y z")) == ["x", "y", "z"]


def test_async_user_code_runs_inside_a_task(model: embserve.Handle) -> None:
    assert model.in_a_task.remote().result(timeout_s=30) is True


def test_user_exceptions_keep_their_type(model: embserve.Handle) -> None:
    with pytest.raises(KeyError, match="missing") as info:
        model.fail.remote("missing").result(timeout_s=30)
    assert "in fail" in (embserve.remote_traceback(info.value) or "")


def test_status_counts_the_replicas(runtime: embserve.Runtime, model: embserve.Handle) -> None:
    status = runtime.status().deployments
    assert status["model"].running_replicas == 2
    assert status["Tokenizer"].running_replicas == 1


def test_request_metadata_reaches_user_code(model: embserve.Handle) -> None:
    ids = {model.context.remote().result(timeout_s=30)[0] for _ in range(5)}
    assert len(ids) == 5 and all(ids)
    assert model.options(routing_key="k").context.remote().result(timeout_s=30)[1] == "k"


def test_calls_made_in_a_replica_inherit_its_deadline(runtime: embserve.Runtime) -> None:
    timed = runtime.run(Timed.bind(Tokenizer.options(name="timed-tokenizer").bind()), name="timed")
    outer, inner = timed.remote().result(timeout_s=30)
    assert outer is not None and inner is not None
    assert abs(outer - inner) < 1.0  # the same deadline, carried as time left across processes


def test_multiplexed_models_load_once_per_replica(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Models.bind(), name="models")
    homes: dict[str, set[str]] = {}
    for index in range(24):
        model_id = f"m{index % 3}"
        replica, loads = handle.options(multiplexed_model_id=model_id).remote().result(30)
        assert loads == 1  # loaded once, every later request a hit
        homes.setdefault(model_id, set()).add(replica)
    assert all(len(replicas) == 1 for replicas in homes.values()), homes


def test_metrics_reach_the_runtime_from_its_replicas(
    runtime: embserve.Runtime, model: embserve.Handle
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    responses = [model.batched.remote(i) for i in range(8)]
    assert [r.result(timeout_s=30) for r in responses] == [10 * i for i in range(8)]
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(runtime.metrics()):
        for sample in family.samples:
            if sample.labels.get("deployment") == "model" and sample.name.endswith("_count"):
                counts[sample.name] = counts.get(sample.name, 0) + sample.value
    assert counts["embserve_batch_size_count"] >= 2  # batches measured inside the replicas
    assert counts["embserve_execution_seconds_count"] >= 8
    assert counts["embserve_request_duration_seconds_count"] >= 8


def test_the_callers_trace_id_reaches_the_replica(model: embserve.Handle) -> None:
    from opentelemetry import trace

    context = trace.SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    with trace.use_span(trace.NonRecordingSpan(context)):
        seen = model.trace_id.remote().result(timeout_s=30)
    assert seen == 0x4BF92F3577B34DA6A3CE929D0E0E4736


def _open_writer(fifo: str) -> int | None:
    # The FIFO's write end, once the replica's thread has its read end open.
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_cancelled_sync_call_keeps_its_slot_until_its_thread_ends(
    runtime: embserve.Runtime, tmp_path: Path, how: str
) -> None:
    name = f"blocking-{how}"
    options = {"request_timeout_s": 0.2} if how == "timeout" else {}
    handle = runtime.run(Blocking.options(**options).bind(), name=name)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def ongoing() -> int:
        return sum(r.ongoing_requests for r in runtime.status().deployments[name].replicas)

    response = handle.read.remote(fifo)
    if how == "cancel":
        with pytest.raises(TimeoutError):
            response.result(timeout_s=0.2)
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            response.result(timeout_s=10)
    else:
        with pytest.raises(embserve.RequestTimeoutError):
            response.result(timeout_s=10)
    # A sync call after the cancel: by its answer the replica has seen the cancel (on one
    # connection, in order), and its blocked thread still holds the slot.
    assert handle.ping.remote().result(timeout_s=10) == "pong"
    assert ongoing() == 1
    # Let the thread end: the replica says so, and the slot is given back.
    writer = wait_for(lambda: _open_writer(fifo))
    assert writer is not None
    with os.fdopen(writer, "w") as pipe:
        pipe.write("done")
    wait_for(lambda: ongoing() == 0)
    runtime.delete(name)
