"""`python -m bench.sampling`: one decode step's token choice on the transformers engine, the per-row
`pick` loop (bench/dynamic_batch.py, the earlier runner's) against the batched `pick_rows`
(model/batch_sampling.py), and the draw inside both, `draw` (candidates, no full sort where it is
not needed) against `draw_sorted` (the full sort of every row, as `draw` was before).

For 1, 8 and 32 rows over a 128,256-wide vocabulary (Llama-3's), every row at temperature 0.7 and
top_p 0.9 (and 1.0: no truncation) with its own seed, on random logits (the same for every path):
the median time of one step's choice, the paths taking turns step by step (so load from elsewhere on
a shared machine falls on all alike), in one thread. Only the sampling is timed, no forward.
`--device cuda` puts the logits on a GPU (each path ends in a transfer to the host, so the times
include the device's work).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.dynamic_batch import pick
from bench.machine import load_average
from model.batch_sampling import pick_rows
from model.grammar import Constraint
from model.penalties import Penalties
from model.torch_sampling import Sampler, draw, draw_sorted
from model.types import SamplingParams

log = logging.getLogger("bench.sampling")

RESULTS = Path(__file__).resolve().parent / "results"
VOCABULARY = 128_256


@dataclass
class _Row:
    """A sequence as the choice sees it (model/torch_sampling.py's Picking): sampler only."""

    sampler: Sampler
    constraint: Constraint | None = None
    penalties: Penalties | None = None
    top_logprobs: int | None = None


def rows_of(count: int, top_p: float) -> dict[int, _Row]:
    sampling = [SamplingParams(max_tokens=1, temperature=0.7, top_p=top_p, seed=i) for i in range(count)]
    return {i: _Row(Sampler(s)) for i, s in enumerate(sampling)}


def sorted_draw(logits: torch.Tensor, settings: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`draw` before the candidates: the full sort of each row, row by row on a CPU as it ran."""
    if logits.device.type != "cpu":
        return draw_sorted(logits, settings, keys)
    rows = zip(logits.split(1), settings.split(1), keys.split(1), strict=True)
    return torch.cat([draw_sorted(*row) for row in rows])


def measure(
    count: int, top_p: float, steps: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Median ms of one step's choice for `count` rows, per path."""
    generator = torch.Generator().manual_seed(count)
    per_row, batched = rows_of(count, top_p), rows_of(count, top_p)
    drawing = rows_of(count, top_p)
    settings = torch.tensor([r.sampler.settings for r in drawing.values()], device=device)
    seconds: dict[str, list[float]] = {"per_row": [], "batched": [], "sorted": [], "draw": []}
    keys = torch.zeros(count, dtype=torch.long, device=device)
    drawn: dict[str, list[int]] = {"sorted": [], "draw": []}

    def loop(logits: torch.Tensor) -> None:
        for i, seq in per_row.items():
            pick(seq, logits[i : i + 1])

    def batch(logits: torch.Tensor) -> None:
        pick_rows(batched, logits)

    def full(logits: torch.Tensor) -> None:
        drawn["sorted"] += sorted_draw(logits, settings, keys).tolist()

    def fast(logits: torch.Tensor) -> None:
        drawn["draw"] += draw(logits, settings, keys).tolist()

    paths = [("per_row", loop), ("batched", batch), ("sorted", full), ("draw", fast)]
    for step in range(steps + 1):
        logits = (torch.randn(count, VOCABULARY, generator=generator) * 3).to(device, dtype)
        keys.copy_(torch.tensor([r.sampler.key() for r in drawing.values()]))
        for key, run in paths if step % 2 else reversed(paths):
            started = time.perf_counter()
            run(logits)
            if step:  # the first is a warm-up
                seconds[key].append(time.perf_counter() - started)
    ms = {key: 1000 * statistics.median(s) for key, s in seconds.items()}
    return {
        "rows": count,
        "top_p": top_p,
        "logits": str(dtype).removeprefix("torch."),
        "per_row_ms": round(ms["per_row"], 2),
        "batched_ms": round(ms["batched"], 2),
        "speedup": round(ms["per_row"] / ms["batched"], 2),
        "sorted_draw_ms": round(ms["sorted"], 2),
        "draw_ms": round(ms["draw"], 2),
        "draw_speedup": round(ms["sorted"] / ms["draw"], 2),
        "same_tokens": drawn["sorted"] == drawn["draw"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| logits | rows | top_p | per-row pick ms | batched pick_rows ms | per-row/batched"
        " | draw, full sort ms | draw ms | full sort/draw | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    lines += [
        f"| {r['logits']} | {r['rows']} | {r['top_p']} | {r['per_row_ms']} | {r['batched_ms']}"
        f" | {r['speedup']}x | {r['sorted_draw_ms']} | {r['draw_ms']} | {r['draw_speedup']}x"
        f" | {r['same_tokens']} |"
        for r in rows
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__)
    p.add_argument("--rows", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--top-p", default="0.9,1.0", help="top_p values (default 0.9,1.0)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per batch size (default 7)")
    p.add_argument("--device", default="cpu", help="where the logits are (default cpu; e.g. cuda)")
    p.add_argument(
        "--dtype",
        default="float32,bfloat16",
        help="the logits' dtypes (bfloat16: what a model on CUDA returns)",
    )
    p.add_argument("--json", action="store_true", help="also write bench/results/sampling.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_before = load_average()
    results = []
    for dtype in (getattr(torch, name) for name in args.dtype.split(",")):
        for top_p in (float(p) for p in args.top_p.split(",")):
            for count in (int(r) for r in args.rows.split(",")):
                results.append(measure(count, top_p, args.steps, torch.device(args.device), dtype))
                log.info("%s", results[-1])
    text = (
        f"Sampling one decode step, {VOCABULARY:,}-wide vocabulary, temperature 0.7, top_p {args.top_p},"
        f" seeded; medians of {args.steps} steps, 1 thread, {args.device}\n\n{table(results)}\n"
    )
    print(text)
    if args.json:
        report = {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "vocabulary": VOCABULARY,
            "steps": args.steps,
            "load_average": {"before": load_before, "after": load_average()},
            "results": results,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sampling.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
