"""The run's outputs: the markdown table, the targets, the PNG chart and the raw JSON."""

from __future__ import annotations

import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.machine import one_line
from bench.metrics import BatchResult, RequestSample, Spread, Summary

log = logging.getLogger(__name__)

ENGINE = "engine in-process"
SEED_LIKE = "seed-like (1 process)"
LLAMA_SERVER = "llama.cpp server"
SERVICE = "service, "  # then "1 worker", "2 workers", ...


def service_name(workers: int) -> str:
    return f"{SERVICE}{workers} worker{'s' if workers > 1 else ''}"


def _order(system: str) -> tuple[int, int, str]:
    """Engine, the service by worker count, the seed-like design, then anything else (llama.cpp)."""
    if system == ENGINE:
        return 0, 0, system
    if system.startswith(SERVICE):
        return 1, int(system.removeprefix(SERVICE).split()[0]), system
    return (2 if system == SEED_LIKE else 3), 0, system


def summarize(batches: list[BatchResult]) -> list[Summary]:
    """One summary per system and client count, by client count, then engine, service, the rest."""
    groups: dict[tuple[str, int], list[BatchResult]] = {}
    for b in batches:
        groups.setdefault((b.system, b.concurrency), []).append(b)

    return [Summary.of(groups[k]) for k in sorted(groups, key=lambda k: (k[1], _order(k[0])))]


def _ms(s: Spread | None, field: str = "median") -> str:
    return "–" if s is None else f"{getattr(s, field) * 1000:.0f}"


def _range(s: Spread | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    if s is None:
        return "–"
    return f"{s.median * scale:{fmt}} ({s.low * scale:{fmt}}–{s.high * scale:{fmt}})"


def table(summaries: list[Summary]) -> str:
    rows = [
        "| system | clients | TTFT p50 ms | TTFT p95 ms | decode tok/s per stream | aggregate tok/s "
        "| queue wait p50 ms (max) | requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        wait = "–" if s.queue_wait_s is None else f"{_ms(s.queue_wait_s)} ({_ms(s.queue_wait_s, 'high')})"
        errors = f" ({s.errors} failed)" if s.errors else ""
        rows.append(
            f"| {s.system} | {s.concurrency} | {_ms(s.ttft_s)} | {_ms(s.ttft_s, 'p95')} | "
            f"{_range(s.decode_tps)} | {_range(s.aggregate_tps)} | {wait} | {s.requests}{errors} |"
        )
    return "\n".join(rows)


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    met: bool | None  # None: not measured in this run


def _find(summaries: list[Summary], system: str, clients: int) -> Summary | None:
    return next((s for s in summaries if s.system == system and s.concurrency == clients), None)


def _median(s: Summary | None, field: str) -> float | None:
    spread = getattr(s, field) if s is not None else None
    return spread.median if spread is not None else None


def _ratio(name: str, num: float | None, den: float | None, floor: float) -> Target:
    """Throughput `num` against `den`, met at `floor`× or more."""
    if not num or not den:
        return Target(name, "not measured", None)
    return Target(name, f"{num / den:.2f}× ({num:.0f} vs {den:.0f} tok/s)", num / den >= floor)


def _services(summaries: list[Summary]) -> list[str]:
    return sorted({s.system for s in summaries if s.system.startswith(SERVICE)}, key=_order)


def targets(summaries: list[Summary], startup_s: list[float]) -> list[Target]:
    """The performance issue's targets, each a ratio of two systems measured side by side."""
    one = service_name(1)
    out = [
        _ratio(
            "streamed decode, service (1 worker, 1 client) ≥ 0.95× engine in-process",
            _median(_find(summaries, one, 1), "decode_tps"),
            _median(_find(summaries, ENGINE, 1), "decode_tps"),
            0.95,
        )
    ]
    e_ttft = _median(_find(summaries, ENGINE, 1), "ttft_s")
    s_ttft = _median(_find(summaries, one, 1), "ttft_s")
    if e_ttft is not None and s_ttft is not None:
        over = (s_ttft - e_ttft) * 1000
        out.append(Target("TTFT overhead ≤ 15 ms p50 at 1 client", f"{over:+.1f} ms", over <= 15))
    else:
        out.append(Target("TTFT overhead ≤ 15 ms p50 at 1 client", "not measured", None))

    out.append(
        _ratio(
            "single-stream decode, service (1 worker) ≥ 1.0× llama.cpp server",
            _median(_find(summaries, one, 1), "decode_tps"),
            _median(_find(summaries, LLAMA_SERVER, 1), "decode_tps"),
            1.0,
        )
    )
    peer = _find(summaries, LLAMA_SERVER, 4)
    for system in _services(summaries):
        ours = _find(summaries, system, 4)
        agg = _ratio(
            f"aggregate at 4 clients, {system} ≥ 1.0× llama.cpp server --parallel 4",
            _median(ours, "aggregate_tps"),
            _median(peer, "aggregate_tps"),
            1.0,
        )
        name = f"TTFT p50 at 4 clients, {system} ≤ 2× llama.cpp server's"
        mine, theirs = _median(ours, "ttft_s"), _median(peer, "ttft_s")
        if mine is None or not theirs:
            ttft = Target(name, "not measured", None)
        else:
            measured = f"{mine / theirs:.1f}× ({mine * 1000:.0f} vs {theirs * 1000:.0f} ms)"
            ttft = Target(name, measured, mine <= 2 * theirs)
        out += [agg, ttft]

    if startup_s:
        ready = Spread.of(startup_s)
        assert ready is not None
        out.append(
            Target(
                "worker ready ≤ 3 s (cache warm)",
                f"{ready.median:.1f} s median, {ready.high:.1f} s max (n={ready.n})",
                ready.median <= 3.0,
            )
        )
    for clients in sorted({s.concurrency for s in summaries}):
        best = max(
            (_median(_find(summaries, svc, clients), "aggregate_tps") or 0.0 for svc in _services(summaries)),
            default=None,
        )
        out.append(
            _ratio(
                f"aggregate at {clients} client{'s' if clients > 1 else ''}, best service ≥ 1.0× seed-like",
                best,
                _median(_find(summaries, SEED_LIKE, clients), "aggregate_tps"),
                1.0,
            )
        )
    return out


def targets_table(items: list[Target]) -> str:
    rows = ["| target | measured | met |", "|---|---|---|"]
    verdict = {True: "yes", False: "no", None: "–"}
    rows += [f"| {t.name} | {t.measured} | {verdict[t.met]} |" for t in items]
    return "\n".join(rows)


def markdown(run: dict[str, Any], summaries: list[Summary], goals: list[Target]) -> str:
    startup = Spread.of(run["worker_startup_s"])
    rss = ", ".join(f"{k} {v:.0f}" for k, v in run["rss_mib"].items())
    lines = [
        f"Machine: {one_line(run['machine'])}.",
        f"Workload: {run['prompt_tokens']}-token prompt, {run['new_tokens']} new tokens (EOS ignored), "
        f"temperature 0; {run['rounds']} interleaved round{'s' if run['rounds'] != 1 else ''}; "
        f"`{run['command']}`.",
        f"1-minute load average {run['load_average']['start']} before the run, "
        f"{run['load_average']['end']} after; {run['duration_s']:.0f} s in all.",
        "",
        table(summaries),
        "",
        "Median (min–max) over requests for per-stream numbers, over rounds for aggregates.",
        "",
    ]
    if startup is not None:
        lines.append(
            "Worker start-up (process start → listed in /health, GGUF cache warm): "
            f"median {startup.median:.1f} s ({startup.low:.1f}–{startup.high:.1f}, n={startup.n}), "
            f"of which loading the model {statistics.median(run['worker_load_s'] or [0.0]):.1f} s."
        )
    lines += [f"RSS MiB (process + children): {rss}.", ""]
    for skipped in run.get("skipped", []):
        lines.append(f"Skipped: {skipped}.")
    lines += ["", targets_table(goals)]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def chart(summaries: list[Summary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [
        ("aggregate_tps", "aggregate tok/s", 1.0),
        ("decode_tps", "decode tok/s per stream", 1.0),
        ("ttft_s", "TTFT p50 (ms)", 1000.0),
    ]
    systems = list(dict.fromkeys(s.system for s in summaries))
    clients = sorted({s.concurrency for s in summaries})
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.8 / len(systems)
    for ax, (field, label, scale) in zip(axes, panels, strict=True):
        for i, system in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for j, c in enumerate(clients):
                spread = getattr(_find(summaries, system, c), field, None)
                if spread is None:
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(spread.median * scale)
                lo.append((spread.median - spread.low) * scale)
                hi.append((spread.high - spread.median) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=system)
        ax.set_xticks(range(len(clients)), [f"{c} client{'s' if c > 1 else ''}" for c in clients])
        ax.set_title(label)
        if field == "ttft_s":
            ax.set_yscale("log")  # queued requests wait seconds, in-process ones tens of ms
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(systems), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, run: dict[str, Any], batches: list[BatchResult]) -> str:
    """Write results.json, results.md and results.png; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(batches)
    goals = targets(summaries, run["worker_startup_s"])
    text = markdown(run, summaries, goals)
    raw = {
        **run,
        "summaries": [asdict(s) for s in summaries],
        "targets": [t.__dict__ for t in goals],
        "batches": [b.to_json() for b in batches],
    }
    (out_dir / "results.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False))
    (out_dir / "results.md").write_text(text + "\n")
    try:
        chart(summaries, out_dir / "results.png", one_line(run["machine"]))
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'); no chart written")
    log.info("results in %s", out_dir)
    return text


def reload(path: Path) -> tuple[dict[str, Any], list[BatchResult]]:
    """A results.json read back, to render it again without measuring again."""
    data = json.loads(path.read_text())
    batches = [
        BatchResult(
            b["system"],
            b["concurrency"],
            b["round"],
            b["wall_s"],
            [RequestSample(**{k: v for k, v in s.items() if k != "decode_tps"}) for s in b["samples"]],
        )
        for b in data.pop("batches")
    ]
    for derived in ("summaries", "targets"):
        data.pop(derived, None)
    return data, batches


if __name__ == "__main__":
    # `python -m bench.report [bench/results/results.json]`: render a finished run again.
    logging.basicConfig(level=logging.INFO)
    source = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent / "results" / "results.json"
    )
    saved_run, saved = reload(source)
    print(write(source.parent, saved_run, saved))
