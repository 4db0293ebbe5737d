"""`python -m bench.structured`: what grammar-constrained decoding costs, per stream, with 4 slots busy.

Two engines in this process, each with 4 slots:
- the embedded SmolLM2 (49k vocabulary), the worker's own loader and settings;
- a tiny random-weight Llama with the real 128k Llama-3 tokenizer, on llama.cpp: at temperature 1
  its samples are nearly uniform over the vocabulary, so the grammar refuses almost every one and
  the full mask is computed nearly every step (the worst case for the check-first scheme).

Each round runs 4 unconstrained and 4 constrained generations at once (temperature 1, 128 tokens,
interleaved, the order alternating), and reports tokens per second per stream, medians over
rounds. Then schema compile time: distinct schemas compiled cold (p50), and a repeated schema (a
cache hit).
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

from api.serving import structured
from model.engine import Engine
from model.types import ChatMessage, Completion, SamplingParams
from tasks.settings import Settings
from tasks.worker import load_engine

log = logging.getLogger("bench.structured")

RESULTS = Path(__file__).resolve().parent / "results"
STREAMS = 4
NEW_TOKENS = 128
MESSAGES = [ChatMessage("user", "List some fruit names as a JSON array of strings.")]
# It cannot close within 128 tokens (300 strings at least): every constrained generation runs its
# whole budget, as every unconstrained one does with EOS ignored, so both decode 4 x 128 tokens.
SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 300}
COMPILE_SCHEMAS = 20


def _batch(engine: Engine, sampling: SamplingParams) -> float:
    """STREAMS generations at once through the engine's scheduler; mean tok/s per stream."""
    prompt = engine.prepare(MESSAGES)
    started = time.perf_counter()
    for key in range(STREAMS):
        engine.scheduler.submit(key, engine.generation(prompt, sampling))
    ended: dict[int, tuple[int, float]] = {}
    while len(ended) < STREAMS:
        for key, event in engine.scheduler.step():
            if isinstance(event, Completion):
                ended[int(key)] = (event.completion_tokens, time.perf_counter() - started)  # type: ignore[call-overload]
    return statistics.mean(tokens / seconds for tokens, seconds in ended.values())


def measure(engine: Engine, rounds: int) -> dict[str, Any]:
    grammar = structured.grammar_for_schema(SCHEMA, "response_format")
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, seed=1, ignore_eos=True)
    constrained = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, seed=1, grammar=grammar)
    _batch(engine, plain)  # warm-up, unrecorded: first-step allocations, the grammar's tokenizer
    _batch(engine, constrained)
    free: list[float] = []
    bound: list[float] = []
    masks_before = engine.grammars.masks
    for round_no in range(rounds):
        order = [(plain, free), (constrained, bound)]
        for sampling, into in order if round_no % 2 == 0 else reversed(order):
            into.append(_batch(engine, sampling))
    masks = engine.grammars.masks - masks_before
    return {
        "unconstrained_tps": statistics.median(free),
        "constrained_tps": statistics.median(bound),
        "ratio": statistics.median(bound) / statistics.median(free),
        "masks_per_token": masks / (rounds * STREAMS * NEW_TOKENS),
        "rounds": rounds,
    }


def compile_times(engine: Engine) -> dict[str, float]:
    cold = []
    for i in range(COMPILE_SCHEMAS):
        schema = {
            "type": "object",
            "properties": {f"field_{i}_{j}": {"type": "integer", "maximum": i + j} for j in range(5)},
            "required": [f"field_{i}_0"],
        }
        grammar = structured.grammar_for_schema(schema, "response_format")
        started = time.perf_counter()
        engine.grammars.constraint(grammar)
        cold.append(time.perf_counter() - started)
    started = time.perf_counter()
    engine.grammars.constraint(grammar)
    return {
        "compile_p50_ms": statistics.median(cold) * 1000,
        "cache_hit_ms": (time.perf_counter() - started) * 1000,
    }


def tiny_llama3_engine(folder: Path) -> Engine:
    from tests.unit.conftest import GGUF_NAME, random_llama3  # torch and the test exporter: bench only

    random_llama3(folder, context_length=1024, gguf=True)
    settings = Settings(
        model_id=str(folder / GGUF_NAME),
        engine="llama.cpp",
        worker_slots=STREAMS,
        model_cache_dir=folder / "cache",
    )
    return load_engine(settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    embedded = load_engine(Settings(worker_slots=STREAMS))
    results["embedded"] = measure(embedded, args.rounds) | compile_times(embedded)
    del embedded
    with tempfile.TemporaryDirectory() as folder:
        results["llama3_128k"] = measure(tiny_llama3_engine(Path(folder)), args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(results, indent=2))
    rows = [
        "| model | unconstrained tok/s per stream | constrained | ratio | masks per token | target | met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, floor in (("embedded", 0.85), ("llama3_128k", 0.7)):
        r = results[name]
        rows.append(
            f"| {name} | {r['unconstrained_tps']:.1f} | {r['constrained_tps']:.1f} | {r['ratio']:.3f}× "
            f"| {r['masks_per_token']:.2f} | ≥ {floor}× | {'yes' if r['ratio'] >= floor else 'no'} |"
        )
    e = results["embedded"]
    rows += [
        "",
        f"Schema compile (embedded model's tokenizer): p50 {e['compile_p50_ms']:.1f} ms over "
        f"{COMPILE_SCHEMAS} distinct schemas; a repeated schema {e['cache_hit_ms']:.2f} ms (cache hit).",
    ]
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
