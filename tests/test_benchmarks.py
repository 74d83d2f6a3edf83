"""The benchmarks run and print their JSON (figures are checked by running them, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_handles_benchmark_quick_run_reports_every_figure() -> None:
    output = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "handles.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    report = json.loads(output)
    assert report["benchmark"] == "handles"
    assert report["async"]["floor_p50_us"] > 0 and report["sync"]["floor_p50_us"] > 0
    assert report["throughput_64_in_flight"]["async_calls_per_s"] > 0
    assert report["threads_left"] == 0
    assert set(report["targets"]) >= {"async_p50_le_25us", "calls_per_s_ge_40000"}


def test_http_benchmark_quick_run_compares_embserve_run_with_both_floors() -> None:
    output = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "http.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    report = json.loads(output)
    assert report["benchmark"] == "http"
    servers = report["servers"]
    assert set(servers) == {
        "embserve_uvicorn",
        "embserve_hypercorn",
        "uvicorn_starlette",
        "hypercorn_starlette",
    }
    assert all(s["req_per_s"] > 0 and s["errors"] == 0 for s in servers.values())
    assert set(report["ratios_req_per_s"]) == {
        "embserve_uvicorn_to_uvicorn_starlette",
        "embserve_hypercorn_to_hypercorn_starlette",
    }
    assert report["embserve_run_default_server"] == "uvicorn"
    alone = report["app_alone_per_request"]
    assert 0 < alone["of_which_runtime_us"] < alone["embserve_app_us"]
    assert alone["plain_starlette_us"] > 0
