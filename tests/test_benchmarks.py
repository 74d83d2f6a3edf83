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


def test_threads_benchmark_quick_run_reports_its_floor() -> None:
    output = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    report = json.loads(output)
    assert report["benchmark"] == "threads"
    assert report["one_thread"]["floor_p50_us"] > 0
    assert report["sixteen_threads"]["floor_calls_per_s"] > 0
    assert 0 <= report["in_caller_thread"] <= 1
