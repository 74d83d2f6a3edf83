"""The Dask backend on a TLS-secured cluster: tls:// addresses and distributed.Security."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import distributed
import numpy as np
import pytest

import embserve
from embserve_dask import DaskBackend

# distributed's constructors are untyped; tests use them through these names.
LocalCluster: Any = distributed.LocalCluster
Security: Any = distributed.Security


def _openssl_security(folder: Path) -> Any:
    # A self-signed certificate that is its own CA, made with the openssl command line tool, so
    # the test runs where the `cryptography` package (which Security.temporary needs) is absent.
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=embserve-test",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    files = {"cert": str(cert), "key": str(key)}
    return Security(
        tls_ca_file=files["cert"],
        tls_scheduler_cert=files["cert"],
        tls_scheduler_key=files["key"],
        tls_worker_cert=files["cert"],
        tls_worker_key=files["key"],
        tls_client_cert=files["cert"],
        tls_client_key=files["key"],
        require_encryption=True,
    )


def _temporary_security(folder: Path) -> Any:
    return Security.temporary()


SECURITIES: list[Any] = [
    pytest.param(
        _openssl_security,
        id="openssl-certificates",
        marks=pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
    ),
    pytest.param(
        _temporary_security,
        id="Security.temporary",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("cryptography") is None,
            reason="Security.temporary() needs the cryptography package, not installed here",
        ),
    ),
]


@embserve.deployment(num_replicas=2)
class Doubler:
    """Answers over TLS."""

    def __call__(self, x: Any) -> Any:
        return x * 2

    def where(self) -> str:
        return embserve.get_replica_context().worker


@pytest.fixture(scope="module", params=SECURITIES)
def tls_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """An in-process cluster that accepts only TLS connections."""
    make: Callable[[Path], Any] = request.param
    security = make(tmp_path_factory.mktemp("tls"))
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tls",
        host="127.0.0.1",
        security=security,
        dashboard_address=":0",
    ) as cluster:
        yield cluster


def test_replicas_serve_over_tls(tls_cluster: Any) -> None:
    assert tls_cluster.scheduler_address.startswith("tls://")
    with embserve.Runtime(backend=DaskBackend(tls_cluster)) as rt:
        handle = rt.run(Doubler.bind(), name="double")
        array = np.ones(1000)
        np.testing.assert_array_equal(handle.remote(array).result(timeout_s=10), array * 2)
        workers = {handle.where.remote().result(timeout_s=10) for _ in range(10)}
        assert workers and all(w.startswith("tls://") for w in workers)
        replica = rt._controllers["double"].running[0]
        assert replica._transport.comm.peer_address.startswith("tls://")


def test_a_plain_tcp_connection_is_refused(tls_cluster: Any) -> None:
    with pytest.raises((OSError, TimeoutError)):
        embserve.Runtime(
            backend=DaskBackend(
                tls_cluster.scheduler_address.replace("tls://", "tcp://"), connect_timeout_s=1
            )
        ).start()
