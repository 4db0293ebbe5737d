"""`python -m bench.kv_cache`: the transformers engine's decode step with KV allocated once
(SlotBatch, the default) against the earlier DynamicCache path (TorchBatch, bench/dynamic_batch.py),
in this process.

For each model (a tiny random Llama of Llama-3's family, the real 128k vocabulary at hidden size 64
and 2 layers; and the embedded SmolLM2-135M, dequantized as the transformers worker loads it),
each path, 1, 4 and 8 slots and two context lengths: the median decode step (ms) and the aggregate
tok/s, with the new/old ratio from the same run. The step time at the long context against the
short one shows the per-step KV copy of the old path as a slope.

Then the issue's target, measured in-process (not through the service): 4 streams decoding
together after ~1,800-token prompts against after ~50-token prompts, per-stream tok/s and the
ratio, on the embedded model.

Then rows of different lengths decoding together (one 1,800-token conversation beside 50-token
ones, a spread of eight, and equal lengths as the control), on the embedded model: the CPU's
decode attention one SDPA call per row over its own columns (model/slot_attention.py, the
default) against one masked call up to the longest row, two runners over one model taking turns.

Every slot decodes the same prompt (its siblings take its KV, not timed): only decode steps are
timed, the two paths alternating step by step (so load from elsewhere on a shared machine falls on
both alike), medians over steps and rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.dynamic_batch import with_dynamic_batch
from bench.machine import describe, load_average
from model.loading import EMBEDDED_MODEL_ID, LoadedModel, load_model
from model.slot_batch import SlotBatch
from model.types import BatchRunner, SamplingParams

log = logging.getLogger("bench.kv_cache")

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("slots", "dynamic")
TARGET_STREAMS = 4
GREEDY = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)


def prompt(length: int, variant: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(length * 1000 + variant)
    return torch.randint(0, 40000, (length,), generator=generator).tolist()  # within both vocabularies


def start(runner: BatchRunner, slots: int, context: int, steps: int) -> list[int]:
    """`slots` sequences of one `context`-token prompt, prefilled (once, the others sharing it)
    until every one decodes; their slots."""
    ids = prompt(context)
    first = runner.add(ids, GREEDY, context + steps)
    added = [first] + [runner.add(ids, GREEDY, steps, share_from=first) for _ in range(slots - 1)]
    return prefilled(runner, added)


def paired_steps(
    runners: dict[str, tuple[BatchRunner, int]], slots: int, steps: int, lengths: list[int] | None = None
) -> dict[str, list[float]]:
    """Seconds of `steps` decode steps of each runner (at its own context, `slots` rows of it; or,
    given `lengths`, one row of each length), the runners taking turns step by step (the order
    reversing every step), so load from elsewhere on the machine falls on all of them alike."""
    added = {
        key: start_mix(runner, lengths, steps) if lengths else start(runner, slots, context, steps)
        for key, (runner, context) in runners.items()
    }
    rows = len(lengths) if lengths else slots
    seconds: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    for _ in range(steps):
        for key in order:
            started = time.perf_counter()
            out = runners[key][0].step()
            seconds[key].append(time.perf_counter() - started)
            assert len(out.tokens) == rows and not out.failed
        order.reverse()
    for key, (runner, _) in runners.items():
        for slot in added[key]:
            runner.drop(slot)
    return seconds


def median_step_ms(
    runners: dict[str, tuple[BatchRunner, int]],
    slots: int,
    steps: int,
    rounds: int,
    lengths: list[int] | None = None,
) -> dict[str, float]:
    """Each runner's median decode step (ms) over `rounds` of `paired_steps`."""
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, seconds in paired_steps(runners, slots, steps, lengths).items():
            times[key] += seconds
    return {key: 1000 * statistics.median(t) for key, t in times.items()}


def load(model_id: str, kv: str, slots: int, threads: int) -> LoadedModel:
    """The model loaded as the transformers worker loads it, with its own copy of the weights and
    the runner of path `kv`: SlotBatch as loaded ("slots") or TorchBatch in its place ("dynamic")."""
    loaded = load_model(
        model_id,
        engine="transformers",
        device="cpu",
        dtype="auto",
        use_4bit=False,
        threads=threads,
        slots=slots,
        cache_dir=Path.home() / ".cache" / "llama3-chat" / "models",
    )
    return with_dynamic_batch(loaded) if kv == "dynamic" else loaded


def compare(
    model_id: str,
    slot_counts: list[int],
    contexts: list[int],
    steps: int,
    rounds: int,
    threads: int,
    machine: dict[str, Any],
) -> list[dict[str, Any]]:
    most = max(slot_counts)
    loaded = {kv: load(model_id, kv, most, threads) for kv in PATHS}
    runners = {kv: m.runner for kv, m in loaded.items()}
    machine["model"] = describe(loaded["slots"])
    paired_steps({kv: (r, 16) for kv, r in runners.items()}, 1, 2)  # first-call costs, untimed
    rows = []
    for context in contexts:
        for slots in slot_counts:
            step_ms = median_step_ms({kv: (r, context) for kv, r in runners.items()}, slots, steps, rounds)
            row = {
                "context": context,
                "slots": slots,
                **{f"{kv}_step_ms": round(step_ms[kv], 2) for kv in PATHS},
                **{f"{kv}_tok_s": round(1000 * slots / step_ms[kv], 1) for kv in PATHS},
                "speedup": round(step_ms["dynamic"] / step_ms["slots"], 2),
            }
            log.info("%s", row)
            rows.append(row)
    return rows


def target(model_id: str, short: int, long: int, steps: int, rounds: int, threads: int) -> dict[str, Any]:
    """Per path, 4 streams' per-stream decode speed after `long`-token prompts over after `short`
    ones: four runners (each path at each length) taking turns step by step."""
    runners = {
        (kv, context): load(model_id, kv, TARGET_STREAMS, threads).runner
        for kv in PATHS
        for context in (short, long)
    }
    keyed = {f"{kv}@{context}": (runner, context) for (kv, context), runner in runners.items()}
    paired_steps({k: (r, 16) for k, (r, _) in keyed.items()}, 1, 2)  # first-call costs, untimed
    step_ms = median_step_ms(keyed, TARGET_STREAMS, steps, rounds)
    return {
        "short": short,
        "long": long,
        "streams": TARGET_STREAMS,
        "step_ms": {key: round(ms, 2) for key, ms in step_ms.items()},
        "per_stream_tok_s": {key: round(1000 / ms, 1) for key, ms in step_ms.items()},
        "long_over_short": {kv: round(step_ms[f"{kv}@{short}"] / step_ms[f"{kv}@{long}"], 2) for kv in PATHS},
    }


MIXES = {
    "1 long, 3 short": [1800, 50, 50, 50],
    "1 long, 7 short": [1800] + [50] * 7,
    "8 spread": [1000, 400, 200, 50, 1800, 50, 120, 30],
    "4 short (equal)": [50] * 4,
    "4 long (equal)": [1800] * 4,
}


def start_mix(runner: BatchRunner, lengths: list[int], steps: int) -> list[int]:
    """One sequence per length, each its own prompt, prefilled until every one decodes."""
    added = [runner.add(prompt(n, i), GREEDY, n + steps) for i, n in enumerate(lengths)]
    return prefilled(runner, added)


def prefilled(runner: BatchRunner, added: list[int]) -> list[int]:
    """Step `runner` until every one of `added` decodes (a failed prefill stops the bench)."""
    decoding: set[int] = set()
    while len(decoding) < len(added):
        out = runner.step()
        if out.failed:
            raise RuntimeError(f"a sequence failed before decoding: {out.failed}")
        decoding |= set(out.tokens)
    return added


def mixed(model_id: str, steps: int, rounds: int, threads: int) -> list[dict[str, Any]]:
    """Rows of different lengths decoding together: the CPU's decode attention one call per row
    over its own columns (model/slot_attention.py) against one masked call over the longest
    row's, the two runners (over one model) taking turns step by step."""
    loaded = load(model_id, "slots", max(len(m) for m in MIXES.values()), threads)
    context = loaded.context_length
    runners = {
        "apart": SlotBatch(loaded.model, torch.device("cpu"), 8, context),
        "one_call": SlotBatch(loaded.model, torch.device("cpu"), 8, context, attend_apart=False),
    }
    rows = []
    for name, lengths in MIXES.items():
        ms = median_step_ms({key: (r, 0) for key, r in runners.items()}, 0, steps, rounds, lengths)
        row = {
            "rows": name,
            "lengths": lengths,
            **{f"{key}_step_ms": round(v, 2) for key, v in ms.items()},
            "speedup": round(ms["one_call"] / ms["apart"], 2),
        }
        log.info("%s", row)
        rows.append(row)
    return rows


def tiny_llama3(folder: Path, context: int) -> str:
    from tests.tiny_llama import random_llama3  # torch and the test models' builder: bench only

    random_llama3(folder, context_length=context, gguf=False)
    return str(folder)


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| context | slots | new step ms | old step ms | new tok/s | old tok/s | new/old speed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['slots']} | {r['slots_step_ms']} | {r['dynamic_step_ms']} | "
            f"{r['slots_tok_s']} | {r['dynamic_tok_s']} | {r['speedup']}x |"
        )
    return "\n".join(lines)


def mixed_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"### rows of different lengths ({EMBEDDED_MODEL_ID}): decode attention per row vs one masked call",
        "",
        "| rows | lengths | per row: step ms | one call: step ms | speed |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lengths = ", ".join(str(n) for n in r["lengths"])
        lines.append(
            f"| {r['rows']} | {lengths} | {r['apart_step_ms']} | {r['one_call_step_ms']} | {r['speedup']}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=__doc__)
    p.add_argument("--slots", default="1,4,8", help="slot counts (default 1,4,8)")
    p.add_argument("--contexts", default="100,2000", help="prompt lengths in tokens (default 100,2000)")
    p.add_argument("--target-contexts", default="50,1800", help="the 4-stream target's short,long prompts")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--quick", action="store_true", help="8 steps, 1 round")
    p.add_argument("--mixed-only", action="store_true", help="only the rows of different lengths")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    steps, rounds = (8, 1) if args.quick else (args.steps, args.rounds)
    slot_counts = [int(s) for s in args.slots.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    short, long = (int(c) for c in args.target_contexts.split(","))
    load_before = load_average()
    if args.mixed_only:
        apart = mixed(EMBEDDED_MODEL_ID, steps, rounds, args.threads)
        RESULTS.mkdir(exist_ok=True)
        report = {"load_average": {"before": load_before, "after": load_average()}, "mixed_lengths": apart}
        (RESULTS / "kv_cache_mixed.json").write_text(json.dumps(report, indent=2))
        print(mixed_table(apart))
        return
    machine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_llama3(Path(tmp), context=max(contexts) + steps * rounds + 64)
        results = {
            "tiny Llama-3 (128k vocabulary, 2 layers)": compare(
                tiny, slot_counts, contexts, steps, rounds, args.threads, machine
            ),
        }
    results[f"embedded {EMBEDDED_MODEL_ID}"] = compare(
        EMBEDDED_MODEL_ID, slot_counts, contexts, steps, rounds, args.threads, machine
    )
    goal = target(EMBEDDED_MODEL_ID, short, long, steps, rounds, args.threads)
    apart = mixed(EMBEDDED_MODEL_ID, steps, rounds, args.threads)
    report: dict[str, Any] = {
        "machine": machine["model"],
        "load_average": {"before": load_before, "after": load_average()},
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "rounds": rounds,
        "results": results,
        "target_4_streams": goal,
        "mixed_lengths": apart,
    }
    text = "\n\n".join(table(title, rows) for title, rows in results.items())
    text += "\n\n" + mixed_table(apart)
    ratios = goal["long_over_short"]
    text += (
        f"\n\n4 streams, per-stream decode speed after {long}-token prompts over after {short}-token"
        f" prompts (in-process, {EMBEDDED_MODEL_ID}): new {ratios.get('slots')}x,"
        f" old {ratios.get('dynamic')}x (target >= 0.75x)\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_cache.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "kv_cache.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
