"""The benchmarks run and print their JSON (figures are checked by running them, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def quick_report(benchmark: str) -> dict[str, Any]:
    """The JSON report of ``benchmarks/<benchmark>.py --quick``."""
    output = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{benchmark}.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    report: dict[str, Any] = json.loads(output)
    return report


def test_handles_benchmark_quick_run_reports_every_figure() -> None:
    report = quick_report("handles")
    assert report["benchmark"] == "handles"
    assert report["async"]["floor_p50_us"] > 0 and report["sync"]["floor_p50_us"] > 0
    assert report["throughput_64_in_flight"]["async_calls_per_s"] > 0
    assert report["threads_left"] == 0
    assert set(report["targets"]) >= {"async_p50_le_25us", "calls_per_s_ge_40000"}


def test_batching_benchmark_quick_run_and_the_table_written_from_it(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "batching.py"),
            "--quick",
            "--backends",
            "none",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(out.read_text())
    assert report["benchmark"] == "batching" and report["floor_items_per_s"] > 0
    assert report["blas"]["source"]
    for place in ("loop", "foreign_loop", "threads"):
        for load in ("4", "16", "64"):
            cells = report["callers"][place][load]
            assert cells["unbatched"]["items_per_s"] > 0
            assert cells["fixed_32_10ms"]["ratio_to_unbatched"] > 0
    assert "loop_64_ge_0.5x_floor" in report["targets"]
    assert all(
        report["no_serving_layer"][place]["items_per_s"] > 0 for place in ("loop", "foreign_loop")
    )
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- figures:start -->\nold\n<!-- figures:end -->\nafter\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--readme", str(readme)]
    subprocess.run([*script, str(out)], check=True, timeout=60)
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- figures:end -->\nafter\n")
    assert "| batching | batched, 64 callers on the runtime's loop |" in text
    assert (
        "| batching | no serving layer (bare asyncio queue), 64 callers on a foreign loop |" in text
    )
    assert subprocess.run([*script, "--check", str(out)], timeout=60).returncode == 0


def test_threads_benchmark_quick_run_reports_its_floor() -> None:
    report = quick_report("threads")
    assert report["benchmark"] == "threads"
    assert report["one_thread"]["floor_p50_us"] > 0
    assert report["sixteen_threads"]["floor_calls_per_s"] > 0
    assert 0 <= report["in_caller_thread"] <= 1


def test_http_benchmark_quick_run_compares_embserve_run_with_its_floors() -> None:
    report = quick_report("http")
    assert report["benchmark"] == "http"
    servers = report["servers"]
    assert set(servers) == {
        "embserve_granian",
        "embserve_uvicorn",
        "embserve_hypercorn",
        "uvicorn_starlette",
        "hypercorn_starlette",
        "granian_starlette",
    }
    assert all(s["req_per_s"] > 0 and s["errors"] == 0 for s in servers.values())
    assert set(report["ratios_req_per_s"]) == {
        "embserve_granian_to_uvicorn_starlette",
        "embserve_uvicorn_to_uvicorn_starlette",
        "embserve_hypercorn_to_hypercorn_starlette",
        "embserve_granian_to_granian_starlette",
    }
    assert report["embserve_run_default_server"] == "granian"
    alone = report["app_alone_per_request"]
    assert 0 < alone["of_which_runtime_us"] < alone["embserve_app_us"]
    assert alone["plain_starlette_us"] > 0
