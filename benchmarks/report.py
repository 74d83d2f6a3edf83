"""Write the table of latest figures in benchmarks/README.md from the benchmarks' JSON reports.

    python benchmarks/report.py [--check] [FILE.json ...]

Each benchmark writes its report with ``--out benchmarks/results/<name>.json`` (``<name>`` is
the benchmark's file name: ``handles``, ``process``, ``dask``, ``http``, ``batching``, ``soak``,
``threads``). This script reads those files (or the ones named), picks each report's headline
figures, each beside its floor or anchor from the same run and their ratio, and replaces the
table between the ``figures`` markers of the README. A report it has no rule for still gets a
row per target it states. ``--check`` only says whether the README is up to date (exit 1 if
not).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"

#: One table row: figure, value, floor or anchor, ratio, target, met (None: no target).
Row = tuple[str, str, str, str, str, bool | None]


def _get(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    small = isinstance(value, float) and abs(value) < 100
    text = f"{value:.3g}" if small else f"{round(value):,}"
    return f"{text} {unit}".strip()


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _met(targets: dict[str, Any], key: str) -> bool | None:
    value = targets.get(key)
    return value if isinstance(value, bool) else None


def batching_rows(r: dict[str, Any]) -> Iterator[Row]:
    """The headline batched cell from each place, and the adaptive policy against fixed ones."""
    floor = _num(r.get("floor_items_per_s"), "items/s (numpy, batches of 32")
    spread = r.get("floor_spread")
    floor += f"; {_num(spread[0])}-{_num(spread[1])} over the run)" if spread else ")"
    targets = r.get("targets", {})
    loop = _get(r, "callers.loop.64.fixed_32_10ms") or {}
    yield (
        "batched, 64 callers on the runtime's loop",
        _num(loop.get("items_per_s"), "items/s"),
        floor,
        _ratio(loop.get("ratio_to_floor")),
        ">= 0.5x",
        _met(targets, "loop_64_ge_0.5x_floor"),
    )
    unbatched = _get(r, "callers.loop.64.unbatched.items_per_s")
    yield (
        "batched vs unbatched, 64 callers on the loop",
        _num(loop.get("items_per_s"), "items/s"),
        _num(unbatched, "items/s unbatched"),
        _ratio(loop.get("ratio_to_unbatched")),
        ">= 1.5x",
        _met(targets, "loop_64_ge_1.5x_unbatched"),
    )
    for place, words, key in (
        ("foreign_loop", "64 callers on a foreign loop", "foreign_loop_64_ge_0.35x_floor"),
        ("threads", "64 threads calling .result()", ""),
    ):
        cell = _get(r, f"callers.{place}.64.fixed_32_10ms") or {}
        yield (
            f"batched, {words}",
            _num(cell.get("items_per_s"), "items/s"),
            floor,
            _ratio(cell.get("ratio_to_floor")),
            ">= 0.35x" if key else "",
            _met(targets, key) if key else None,
        )
    for place, words in (("loop", "the runtime's loop"), ("foreign_loop", "a foreign loop")):
        bare = _get(r, f"no_serving_layer.{place}") or {}
        if bare:
            yield (
                f"no serving layer (bare asyncio queue), 64 callers on {words}",
                _num(bare.get("items_per_s"), "items/s"),
                floor,
                _ratio(bare.get("ratio_to_floor")),
                "",
                None,
            )
    for backend, cells in (r.get("backends") or {}).items():
        best = max((k for k in cells if k != "unbatched"), key=lambda k: cells[k]["items_per_s"])
        yield (
            f"batched vs unbatched, 64 callers, {backend} backend ({best})",
            _num(cells[best]["items_per_s"], "items/s"),
            _num(cells["unbatched"]["items_per_s"], "items/s unbatched"),
            _ratio(cells[best]["ratio_to_unbatched"]),
            "> 1x",
            cells[best]["ratio_to_unbatched"] > 1,
        )
    adaptive = _get(r, "adaptive_vs_best_fixed.loop") or {}
    if adaptive:
        worst = min(adaptive.values(), key=lambda v: v["throughput_ratio"])
        yield (
            "adaptive policy vs best fixed setting, worst load",
            "",
            f"best fixed ({worst.get('best_fixed')})",
            _ratio(worst["throughput_ratio"]),
            ">= 0.9x",
            _met(targets, "adaptive_within_10pct_of_best_fixed_throughput"),
        )


def handles_rows(r: dict[str, Any]) -> Iterator[Row]:
    """Handle-call latency against an asyncio hand-off and a bare cross-thread call."""
    targets = r.get("targets", {})
    for key, words, floor_words in (
        ("async", "async handle call p50", "asyncio queue hand-off"),
        ("sync", "sync handle call p50 (thread)", "run_coroutine_threadsafe().result()"),
    ):
        cell = r.get(key, {})
        yield (
            words,
            _num(cell.get("p50_us"), "us"),
            f"{_num(cell.get('floor_p50_us'), 'us')} ({floor_words})",
            _ratio(cell.get("ratio_p50")),
            "<= 5x" if key == "async" else "",
            _met(targets, "async_p50_le_5x_floor") if key == "async" else None,
        )
    rates = r.get("throughput_64_in_flight", {})
    sync_rate, sync_floor = rates.get("sync_calls_per_s"), rates.get("sync_floor_calls_per_s")
    yield (
        "sync calls/s, 64 in flight",
        _num(sync_rate, "calls/s"),
        _num(sync_floor, "calls/s (run_coroutine_threadsafe)"),
        _ratio(sync_rate / sync_floor if sync_rate and sync_floor else None),
        "",
        None,
    )


def process_rows(r: dict[str, Any]) -> Iterator[Row]:
    """A worker-process replica against a raw pipe."""
    latency, rate, big = r.get("latency", {}), r.get("throughput", {}), r.get("numpy_8mb", {})
    yield (
        "process replica call p50",
        _num(latency.get("replica_p50_us"), "us"),
        _num(latency.get("raw_pipe_p50_us"), "us (raw pipe)"),
        _ratio(latency.get("ratio")),
        "<= 2x",
        None if latency.get("ratio") is None else latency["ratio"] <= 2,
    )
    yield (
        "process replica call p50, from a plain thread",
        _num(latency.get("replica_sync_caller_p50_us"), "us"),
        _num(latency.get("raw_pipe_p50_us"), "us (raw pipe)"),
        _ratio(latency.get("sync_ratio")),
        "",
        None,
    )
    yield (
        "process replica calls/s, 64 in flight",
        _num(rate.get("replica_calls_per_s"), "calls/s"),
        _num(rate.get("raw_pipe_calls_per_s"), "calls/s (raw pipe)"),
        _ratio(rate.get("ratio")),
        "",
        None,
    )
    yield (
        "process replica, 8 MB numpy argument",
        _num(big.get("replica_ms"), "ms"),
        _num(big.get("pickle5_oob_pipe_ms"), "ms (pickle 5 out-of-band)"),
        _ratio(big.get("ratio")),
        "<= 1.5x",
        None if big.get("ratio") is None else big["ratio"] <= 1.5,
    )


def dask_rows(r: dict[str, Any]) -> Iterator[Row]:
    """The Dask backend against a raw Dask actor."""
    yield (
        "dask replica call p50",
        _num(r.get("embserve_p50_us"), "us"),
        _num(r.get("actor_p50_us"), "us (Dask actor)"),
        _ratio(r.get("p50_vs_actor")),
        "",
        None,
    )
    yield (
        "dask replica calls/s, 64 in flight",
        _num(r.get("embserve_calls_per_s"), "calls/s"),
        _num(r.get("actor_calls_per_s"), "calls/s (Dask actor)"),
        _ratio(r.get("rate_vs_actor")),
        "",
        None,
    )


def http_rows(r: dict[str, Any]) -> Iterator[Row]:
    """``embserve run`` on each server against its floor; the target is the default server's."""
    served, ratios = r.get("servers", {}), r.get("ratios_req_per_s", {})
    default = f"embserve_{r.get('embserve_run_default_server')}"

    def versus(name: str, other: str, what: str, target: float | None) -> Row:
        ratio = ratios.get(f"{name}_to_{other}")
        return (
            f"HTTP no-op, {name.replace('_', ' + ')}, {what}",
            _num(served.get(name, {}).get("req_per_s"), "req/s"),
            _num(served.get(other, {}).get("req_per_s"), f"req/s ({other.replace('_', ' + ')})"),
            _ratio(ratio),
            f">= {target}x" if target else "",
            None if target is None or ratio is None else ratio >= target,
        )

    connections = f"{r.get('connections', '?')} connections"
    for name, floor in r.get("floors", {}).items():
        yield versus(name, floor, connections, r.get("target_ratio") if name == default else None)
        if name == default:  # the steadier figure on a shared machine; no target
            yield (
                f"server CPU a request, {name.replace('_', ' + ')} (floor's over embserve's)",
                _num(served.get(name, {}).get("cpu_us_per_request"), "us"),
                _num(served.get(floor, {}).get("cpu_us_per_request"), "us"),
                _ratio(r.get("ratios_cpu_per_request", {}).get(f"{name}_to_{floor}")),
                "",
                None,
            )
    for name, anchor in r.get("anchors", {}).items():
        yield versus(name, anchor, "against Starlette on the same server", None)


def threads_rows(r: dict[str, Any]) -> Iterator[Row]:
    """Plain threads calling sync user code, against a bare cross-thread loop call."""
    one, many = r.get("one_thread", {}), r.get("sixteen_threads", {})
    floor = "run_coroutine_threadsafe(noop()).result()"
    yield (
        "a thread calling a sync deployment, p50",
        _num(one.get("p50_us"), "us"),
        f"{_num(one.get('floor_p50_us'), 'us')} ({floor})",
        _ratio(one.get("ratio")),
        "<= 0.5x",
        _met(r.get("targets", {}), "p50_le_half_floor"),
    )
    yield (
        "16 threads calling a sync deployment",
        _num(many.get("calls_per_s"), "calls/s"),
        f"{_num(many.get('floor_calls_per_s'), 'calls/s')} (the same, 16 threads)",
        _ratio(many.get("ratio")),
        ">= 1.0x",
        _met(r.get("targets", {}), "calls_per_s_ge_floor"),
    )


def soak_rows(r: dict[str, Any]) -> Iterator[Row]:
    """The soak's pass/fail figures."""
    yield (
        f"soak, {r.get('backend', '?')} backend, {_num(r.get('seconds'), 's')}",
        _num(r.get("rate_per_s"), "req/s"),
        _num(r.get("capacity_per_s"), "req/s (measured capacity)"),
        "",
        "RSS < +5%, none hung, every kill recovered",
        all(r.get("targets", {}).values()) if r.get("targets") else None,
    )


def generic_rows(r: dict[str, Any]) -> Iterator[Row]:
    """One row per stated target, for a report this script has no rule for."""
    for key, met in r.get("targets", {}).items():
        yield (key.replace("_", " "), "", "", "", "", met if isinstance(met, bool) else None)


RULES: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "handles": handles_rows,
    "process": process_rows,
    "dask": dask_rows,
    "http": http_rows,
    "batching": batching_rows,
    "soak": soak_rows,
    "threads": threads_rows,
}


def machine_of(report: dict[str, Any]) -> str:
    """The machine a report says it ran on (``--out`` records it), in a few words."""
    machine = report.get("machine") or {}
    words = [f"{machine['cpus']} CPUs" if machine.get("cpus") else "", machine.get("platform", "")]
    return ", ".join(w for w in words if w) or "not recorded"


def software_of(report: dict[str, Any]) -> str:
    """Python and, where the report names it, the BLAS build and its threads."""
    words = [f"Python {report['python']}"] if report.get("python") else []
    blas = report.get("blas") or {}
    if blas.get("name"):
        threads = blas.get("num_threads")
        words.append(f"{blas['name']} {blas.get('version', '')} with {threads} thread(s)")
    return ", ".join(words)


def table(files: list[Path]) -> str:
    """The Markdown the README gets between its markers."""
    lines = [
        "| benchmark | figure | value | floor / anchor (same run) | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    machines: dict[str, list[str]] = {}
    software: list[str] = []
    for path in files:
        report = json.loads(path.read_text())
        name = path.stem
        machines.setdefault(machine_of(report), []).append(name)
        if software_of(report):
            software.append(f"{name}: {software_of(report)}")
        for figure, value, floor, ratio, target, met in RULES.get(name, generic_rows)(report):
            mark = "" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {name} | {figure} | {value} | {floor} | {ratio} | {target} | {mark} |")
    lines.append("")
    for machine, names in machines.items():
        lines.append(f"Measured on: {machine} ({', '.join(names)}).")
    if software:
        lines.append("")
        lines.append(f"Software: {'; '.join(software)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="reports (default: results/*.json)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    options = parser.parse_args()
    readme: Path = options.readme
    files = options.files or sorted(RESULTS.glob("*.json"))
    if not files:
        sys.exit(f"no reports: run a benchmark with --out {RESULTS}/<name>.json first")
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{table(files)}\n{END}{tail}"
    if options.check:
        sys.exit(0 if updated == text else 1)
    readme.write_text(updated)


if __name__ == "__main__":
    main()
