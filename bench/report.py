"""The run's outputs: the markdown table, the targets, the PNG chart and the raw JSON."""

from __future__ import annotations

import json
import logging
import re
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
LLAMA_SERVER = "llama.cpp server"  # then " --parallel 4", ...
SERVICE = "service"  # then ", 1 worker", ", 1 worker x 4 slots", " (transformers), 1 worker x 1 slot"
BUSY = " + 1 busy core"  # a system measured while another process keeps one core busy
_SERVICE_NAME = re.compile(
    r"service(?: \((?P<engine>[^)]+)\))?, (?P<workers>\d+) workers?(?: x (?P<slots>\d+) slots?)?"
)


def service_name(workers: int, slots: int | None = None, engine: str | None = None) -> str:
    """E.g. "service, 2 workers"; with slots "service, 1 worker x 4 slots"; engines in brackets."""
    name = f"{SERVICE}{f' ({engine})' if engine else ''}, {workers} worker{'s' if workers > 1 else ''}"
    return name if slots is None else f"{name} x {slots} slot{'s' if slots > 1 else ''}"


def llama_server_name(slots: int) -> str:
    return f"{LLAMA_SERVER} --parallel {slots}"


def _order(system: str) -> tuple[int, int, int, str]:
    """Engine, the service (llama.cpp by workers then slots, then other engines), the seed-like
    design, llama.cpp's server, then each of those measured with a busy core."""
    base = system.removesuffix(BUSY)
    busy = 10 if base != system else 0
    if base == ENGINE:
        return busy, 0, 0, system
    if m := _SERVICE_NAME.fullmatch(base):
        return busy + (2 if m["engine"] else 1), int(m["workers"]), int(m["slots"] or 0), system
    if base.startswith(LLAMA_SERVER):
        return busy + 4, int(base.split()[-1]) if base[-1].isdigit() else 0, 0, system
    return busy + 3, 0, 0, system


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
    """Every service row measured on a quiet machine."""
    names = {s.system for s in summaries if _SERVICE_NAME.fullmatch(s.system)}
    return sorted(names, key=_order)


def _worker_services(summaries: list[Summary]) -> list[str]:
    """The llama.cpp service stacks with one slot per worker: "service, N workers"."""
    return [n for n in _services(summaries) if (m := _SERVICE_NAME.fullmatch(n)) and not m["slots"]]


def _ttft_ratio(name: str, mine: float | None, theirs: float | None, ceiling: float) -> Target:
    if mine is None or not theirs:
        return Target(name, "not measured", None)
    measured = f"{mine / theirs:.2f}× ({mine * 1000:.0f} vs {theirs * 1000:.0f} ms)"
    return Target(name, measured, mine <= ceiling * theirs)


def targets(summaries: list[Summary], run: dict[str, Any]) -> list[Target]:
    """The performance issues' targets, each a ratio of two systems measured side by side."""
    one = service_name(1)
    peer_name = llama_server_name(4)
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
            f"single-stream decode, service (1 worker) ≥ 1.0× {peer_name}",
            _median(_find(summaries, one, 1), "decode_tps"),
            _median(_find(summaries, peer_name, 1), "decode_tps"),
            1.0,
        )
    )
    peer = _find(summaries, peer_name, 4)
    for system in _worker_services(summaries):
        ours = _find(summaries, system, 4)
        agg = _ratio(
            f"aggregate at 4 clients, {system} ≥ 1.0× {peer_name}",
            _median(ours, "aggregate_tps"),
            _median(peer, "aggregate_tps"),
            1.0,
        )
        ttft = _ttft_ratio(
            f"TTFT p50 at 4 clients, {system} ≤ 2× {peer_name}'s",
            _median(ours, "ttft_s"),
            _median(peer, "ttft_s"),
            2.0,
        )
        out += [agg, ttft]

    if startup_s := run["worker_startup_s"]:
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
    return out + slot_targets(summaries, run) + batch_targets(run)


def _agg(summaries: list[Summary], system: str, clients: int) -> float | None:
    return _median(_find(summaries, system, clients), "aggregate_tps")


def _worker_rss(run: dict[str, Any], system: str) -> float | None:
    parts = run.get("rss_mib", {}).get(system)
    return parts.get("worker1") if isinstance(parts, dict) else None


def _interference_rows(run: dict[str, Any], system: str) -> list[dict[str, Any]]:
    return [r for r in run.get("interference", []) if r["system"] == system and not r["errors"]]


def _over_rounds(rows: list[dict[str, Any]], field: str) -> float | None:
    """A field's median over rounds; None when no round has it (a run from before it existed)."""
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(values) if values else None


def interference_targets(run: dict[str, Any]) -> list[Target]:
    """The prefill policy's targets (issue 19): the long prompt's TTFT against llama-server's, and
    the running streams never frozen (largest gap) nor crawling (median gap while it prefills)."""
    x4, p4 = service_name(1, 4), llama_server_name(4)
    ours, theirs = _interference_rows(run, x4), _interference_rows(run, p4)
    names = (
        f"prefill interference, {x4}: long prompt's TTFT ≤ 1.3× {p4}'s",
        f"prefill interference, {x4}: running streams' largest gap ≤ 1 s",
        f"prefill interference, {x4}: median gap while it prefills ≤ 3× median gap before",
    )
    if not ours:
        return [Target(n, "not measured", None) for n in names]
    out = []
    ttft, peer_ttft = _over_rounds(ours, "long_ttft_s"), _over_rounds(theirs, "long_ttft_s")
    if ttft is not None and peer_ttft:
        measured = f"{ttft / peer_ttft:.2f}× ({ttft:.1f} vs {peer_ttft:.1f} s)"
        out.append(Target(names[0], measured, ttft <= 1.3 * peer_ttft))
    else:
        out.append(Target(names[0], "not measured", None))
    largest = _over_rounds(ours, "max_gap_s")
    assert largest is not None
    peer_largest = _over_rounds(theirs, "max_gap_s")
    vs = f"; {p4}: {peer_largest * 1000:.0f} ms" if peer_largest is not None else ""
    out.append(Target(names[1], f"{largest * 1000:.0f} ms{vs}", largest <= 1.0))
    during = _over_rounds(ours, "median_gap_during_prefill_s")
    before = _over_rounds(ours, "median_gap_before_s")
    if during is not None and before:
        measured = f"{during / before:.1f}× ({during * 1000:.0f} / {before * 1000:.0f} ms)"
        out.append(Target(names[2], measured, during <= 3 * before))
    else:
        out.append(Target(names[2], "not measured", None))
    return out


def slot_targets(summaries: list[Summary], run: dict[str, Any]) -> list[Target]:
    """Continuous batching's targets (issue #11): slots against llama.cpp's server and 1 slot."""
    x1, x4, x8 = service_name(1), service_name(1, 4), service_name(1, 8)
    p4, p8 = llama_server_name(4), llama_server_name(8)
    t1, t4 = service_name(1, 1, "transformers"), service_name(1, 4, "transformers")
    out = [
        _ratio(
            f"aggregate at 4 clients, {x4} ≥ 1.05× {p4}", _agg(summaries, x4, 4), _agg(summaries, p4, 4), 1.05
        ),
        _ttft_ratio(
            f"TTFT p50 at 4 clients, {x4} ≤ 1.5× {p4}'s",
            _median(_find(summaries, x4, 4), "ttft_s"),
            _median(_find(summaries, p4, 4), "ttft_s"),
            1.5,
        ),
        _ratio(
            f"aggregate at 8 clients, {x8} ≥ 1.05× {p8}", _agg(summaries, x8, 8), _agg(summaries, p8, 8), 1.05
        ),
        _ratio(
            f"decode at 1 client, {x4} ≥ 0.95× {x1} (1 slot)",
            _median(_find(summaries, x4, 1), "decode_tps"),
            _median(_find(summaries, x1, 1), "decode_tps"),
            0.95,
        ),
    ]
    name = f"worker RSS, {x4} ≤ 1.3× {x1} (1 slot)"
    four, single = _worker_rss(run, x4), _worker_rss(run, x1)
    if four and single:
        out.append(
            Target(name, f"{four / single:.2f}× ({four:.0f} vs {single:.0f} MiB)", four <= 1.3 * single)
        )
    else:
        out.append(Target(name, "not measured", None))
    out += interference_targets(run)
    out += [
        _ratio(
            "transformers: aggregate at 4 clients, 4 slots ≥ 2.5× 1 slot",
            _agg(summaries, t4, 4),
            _agg(summaries, t1, 4),
            2.5,
        ),
        _ratio(
            f"contention: aggregate at 4 clients, {x4}{BUSY} ≥ 0.6× without",
            _agg(summaries, x4 + BUSY, 4),
            _agg(summaries, x4, 4),
            0.6,
        ),
    ]
    return out


def batch_targets(run: dict[str, Any]) -> list[Target]:
    """The Batch API's targets (issue #12), each from batches and clients measured in one round."""
    x4 = service_name(1, 4)
    rows = [r for r in run.get("batch", []) if r["system"] == x4 and not r["errors"]]
    name = f"batch API, {x4}: 64-line batch ≥ 0.95× aggregate of 4 interactive clients"
    wait_name = f"batch API, {x4}: interactive queue wait p50 ≤ mean generation time of one batch line"
    if not rows:
        return [Target(name, "not measured", None), Target(wait_name, "not measured", None)]
    batch_tps = statistics.median(r["batch_tps"] for r in rows)
    clients_tps = statistics.median(r["interactive_tps"] for r in rows)
    waits = [w for r in rows for w in r["probe_waits_s"]]
    line_s = statistics.median(r["line_generation_mean_s"] for r in rows)
    out = [_ratio(name, batch_tps, clients_tps, 0.95)]
    if waits and line_s:
        wait = statistics.median(waits)
        measured = f"{wait:.2f} s vs {line_s:.2f} s ({len(waits)} requests)"
        out.append(Target(wait_name, measured, wait <= line_s))
    else:
        out.append(Target(wait_name, "not measured", None))
    return out


def batch_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| system | round | lines | batch wall s | batch tok/s | 4 clients tok/s | ratio "
        "| interactive wait p50 s | max s | line generation mean s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (_order(r["system"]), r["round"])):
        waits = r["probe_waits_s"] or [float("nan")]
        ratio = r["batch_tps"] / r["interactive_tps"] if r["interactive_tps"] else float("nan")
        out.append(
            f"| {r['system']} | {r['round']} | {r['lines']} | {r['batch_wall_s']:.1f} | {r['batch_tps']:.1f} "
            f"| {r['interactive_tps']:.1f} | {ratio:.2f} | {statistics.median(waits):.2f} | {max(waits):.2f} "
            f"| {r['line_generation_mean_s']:.2f} | {len(r['errors'])} |"
        )
    return "\n".join(out)


def targets_table(items: list[Target]) -> str:
    rows = ["| target | measured | met |", "|---|---|---|"]
    verdict = {True: "yes", False: "no", None: "–"}
    rows += [f"| {t.name} | {t.measured} | {verdict[t.met]} |" for t in items]
    return "\n".join(rows)


INTERFERENCE_NOTE = (
    "Prefill interference: 3 streams decode (the workload's prompt, up to 1,000 tokens), then a "
    "{tokens}-token prompt arrives (16 new tokens); the streams are closed 1 s after it ends. Gaps are "
    "between SSE chunks that carry text, as the client sees them: the service coalesces text within "
    "STREAM_COALESCE_SECONDS (30 ms) of its last event into one chunk, llama.cpp's server sends one "
    'chunk per token. "While waiting": the largest gap overlapping the long prompt\'s wait for its '
    'first token. "Outlasted": all 3 streams still decoding when the long prompt\'s first token came.'
)


def interference_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| system | round | largest gap ms | median gap ms: before / while waiting / all | p99 gap ms "
        "| largest gap while waiting ms | gaps > 5× median | long prompt TTFT s | outlasted | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: (_order(r["system"]), r["round"])):
        before, during = r.get("median_gap_before_s"), r.get("median_gap_during_prefill_s")
        medians = "–" if before is None or during is None else f"{before * 1000:.0f} / {during * 1000:.0f} / "
        out.append(
            f"| {r['system']} | {r['round']} | {r['max_gap_s'] * 1000:.0f} "
            f"| {medians}{r['median_gap_s'] * 1000:.0f} "
            f"| {r['p99_gap_s'] * 1000:.0f} | {r['max_gap_during_prefill_s'] * 1000:.0f} "
            f"| {r.get('gaps_over_5x_median', '–')} of {r.get('gaps', '–')} "
            f"| {r['long_ttft_s']:.2f} | {'yes' if r['outlasted'] else 'no'} | {len(r['errors'])} |"
        )
    return "\n".join(out)


def markdown(run: dict[str, Any], summaries: list[Summary], goals: list[Target]) -> str:
    startup = Spread.of(run["worker_startup_s"])
    rss = "; ".join(
        f"{k}: " + (", ".join(f"{p} {m:.0f}" for p, m in v.items()) if isinstance(v, dict) else f"{v:.0f}")
        for k, v in run["rss_mib"].items()
    )
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
    lines += [f"RSS MiB after the runs (process + children): {rss}.", ""]
    lines += [f"{note}" for note in run.get("notes", [])]
    if run.get("interference"):
        lines += ["", interference_table(run["interference"]), ""]
        lines += [INTERFERENCE_NOTE.format(tokens=run["interference"][0]["prompt_tokens"]), ""]
    if run.get("batch"):
        lines += ["", batch_table(run["batch"]), ""]
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
    systems = sorted({s.system for s in summaries}, key=_order)
    clients = sorted({s.concurrency for s in summaries})
    # Each client count's group holds only the systems measured there, each in its own colour.
    groups = {c: [name for name in systems if _find(summaries, name, c)] for c in clients}
    colours = plt.get_cmap("tab20").colors
    colour = {name: colours[i % len(colours)] for i, name in enumerate(systems)}
    width = 0.85 / max(len(g) for g in groups.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 5))
    labelled: set[str] = set()  # one legend entry per system, from the first panel
    for ax, (field, label, scale) in zip(axes, panels, strict=True):
        for j, c in enumerate(clients):
            for k, system in enumerate(groups[c]):
                spread = getattr(_find(summaries, system, c), field, None)
                if spread is None:
                    continue
                legend = system if ax is axes[0] and system not in labelled else None
                labelled.add(system)
                ax.bar(
                    j + (k - (len(groups[c]) - 1) / 2) * width,
                    spread.median * scale,
                    width,
                    yerr=[[(spread.median - spread.low) * scale], [(spread.high - spread.median) * scale]],
                    capsize=2,
                    color=colour[system],
                    label=legend,
                )
        ax.set_xticks(range(len(clients)), [f"{c} client{'s' if c > 1 else ''}" for c in clients])
        ax.set_title(label)
        if field == "ttft_s":
            ax.set_yscale("log")  # queued requests wait seconds, in-process ones tens of ms
    handles, names = axes[0].get_legend_handles_labels()
    ordered = sorted(zip(names, handles, strict=True), key=lambda pair: _order(pair[0]))
    fig.legend(
        [h for _, h in ordered],
        [n for n, _ in ordered],
        loc="lower center",
        ncol=min(len(systems), 4),
        fontsize=8,
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.045 * (1 + len(systems) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, run: dict[str, Any], batches: list[BatchResult]) -> str:
    """Write results.json, results.md and results.png; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(batches)
    goals = targets(summaries, run)
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
