"""A replica's process admits only its own runtime: a comm that does not present the replica's
token is closed before anything it sent is unpickled, and the replica still serves.

The strays are real comms, opened with the cluster's own security to the replica's real
address, at the one moment they can matter: after the replica listens, before its runtime
connects. The test puts them there by wrapping the backend's ``connect``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed.comm.core import CommClosedError

import embserve
import embserve_dask.backend
from embserve_dask import DaskBackend
from embserve_dask._child import TOKEN_KEY
from tests.dask.clusters import loopback_cluster

pytestmark = pytest.mark.timeout(90)

# distributed's serialize module (shadowed by a function of the same name in its package),
# and its untyped names.
_serialize = importlib.import_module("distributed.protocol.serialize")
to_serialize: Any = _serialize.to_serialize
ToPickle: Any = _serialize.ToPickle


class Touch:
    """Unpickling it creates ``path``: proof that the replica unpickled what a stray sent."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@embserve.deployment
def pid() -> int:
    """Where the replica runs."""
    return os.getpid()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One in-process worker on 127.0.0.1 (its replicas run in processes of their own)."""
    with loopback_cluster(n_workers=1, threads_per_worker=1, processes=False) as local_cluster:
        yield local_cluster


def test_comms_without_the_token_are_refused_and_the_replica_serves(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = embserve_dask.backend.connect
    refused: list[str] = []
    markers = [tmp_path / "serialized", tmp_path / "pickled"]
    strays: list[dict[str, Any]] = [
        {TOKEN_KEY: b"not the token"},
        {"op": "start", "a": to_serialize(Touch(markers[0])), "b": ToPickle(Touch(markers[1]))},
    ]

    async def stray_first(address: str, **kwargs: Any) -> Any:
        while strays:
            stray = await real_connect(address, **kwargs)  # a cluster peer, TLS or not
            await stray.write(strays.pop(0))
            with pytest.raises((CommClosedError, OSError)):
                await asyncio.wait_for(stray.read(), 10)  # closed by the replica at once
            refused.append(address)
        return await real_connect(address, **kwargs)

    monkeypatch.setattr(embserve_dask.backend, "connect", stray_first)
    with embserve.Runtime(backend=DaskBackend(cluster)) as rt:
        handle = rt.run(pid.bind())
        replica_pid = handle.remote().result(timeout_s=10)
        (replica,) = rt.status().deployments["pid"].replicas
        assert replica_pid == replica.info["pid"] != os.getpid()
        assert len(refused) == 2 and len(set(refused)) == 1  # both at the replica that serves
        assert [handle.remote().result(timeout_s=10) for _ in range(3)] == [replica_pid] * 3
    assert not any(marker.exists() for marker in markers)
