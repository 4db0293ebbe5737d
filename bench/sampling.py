"""`python -m bench.sampling`: one decode step's token choice on the transformers engine, the per-row
`pick` loop (model/torch_sampling.py) against the batched `pick_rows` (model/batch_sampling.py).

For 1, 8 and 32 rows over a 128,256-wide vocabulary (Llama-3's), every row at temperature 0.7 and
top_p 0.9 with its own seed, on random logits (the same for both paths): the median time of one
step's choice, both paths alternating step by step (so load from elsewhere on a shared machine
falls on both alike), in one thread. Only the sampling is timed, no forward. `--device cuda` puts
the logits on a GPU (each path ends in a transfer to the host, so the times include the device's
work).
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

from bench.machine import load_average
from model.batch_sampling import pick_rows
from model.grammar import Constraint
from model.penalties import Penalties
from model.torch_sampling import Sampler, pick
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


def rows_of(count: int) -> dict[int, _Row]:
    sampling = [SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, seed=i) for i in range(count)]
    return {i: _Row(Sampler(s)) for i, s in enumerate(sampling)}


def measure(count: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Median ms of one step's choice for `count` rows, per path."""
    generator = torch.Generator().manual_seed(count)
    per_row, batched = rows_of(count), rows_of(count)
    seconds: dict[str, list[float]] = {"per_row": [], "batched": []}

    def loop(logits: torch.Tensor) -> None:
        for i, seq in per_row.items():
            pick(seq, logits[i : i + 1])

    def batch(logits: torch.Tensor) -> None:
        pick_rows(batched, logits)

    paths = [("per_row", loop), ("batched", batch)]
    for step in range(steps + 1):
        logits = (torch.randn(count, VOCABULARY, generator=generator) * 3).to(device)
        for key, run in paths if step % 2 else reversed(paths):
            started = time.perf_counter()
            run(logits)
            if step:  # the first is a warm-up
                seconds[key].append(time.perf_counter() - started)
    ms = {key: 1000 * statistics.median(s) for key, s in seconds.items()}
    return {
        "rows": count,
        "per_row_ms": round(ms["per_row"], 2),
        "batched_ms": round(ms["batched"], 2),
        "speedup": round(ms["per_row"] / ms["batched"], 2),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rows | per-row pick ms | batched pick_rows ms | per-row/batched |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['rows']} | {r['per_row_ms']} | {r['batched_ms']} | {r['speedup']}x |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__)
    p.add_argument("--rows", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per batch size (default 7)")
    p.add_argument("--device", default="cpu", help="where the logits are (default cpu; e.g. cuda)")
    p.add_argument("--json", action="store_true", help="also write bench/results/sampling.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_before = load_average()
    results = []
    for count in (int(r) for r in args.rows.split(",")):
        results.append(measure(count, args.steps, torch.device(args.device)))
        log.info("%s", results[-1])
    text = (
        f"Sampling one decode step, {VOCABULARY:,}-wide vocabulary, temperature 0.7, top_p 0.9,"
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
