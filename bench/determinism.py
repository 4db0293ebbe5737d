"""`python -m bench.determinism`: does a greedy request give the same text alone and batched?

Runs N chat prompts greedily through one engine, each alone (one slot busy), then the same
prompts in batches of 4 (four slots busy, admitted together), and reports how many differ and at
which generated token the first difference comes. In-process, on the worker's own loader, so
it measures the engine and nothing of the queue.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Hashable, Sequence

from model.engine import Engine
from model.generation import Generation
from model.types import ChatMessage, SamplingParams
from tasks.settings import get_settings
from tasks.worker import load_engine

log = logging.getLogger("bench.determinism")

TOPICS = (
    "космос", "море", "горы", "кошки", "собаки", "история Рима", "квантовая физика", "футбол",
    "музыка", "шахматы", "Python", "погода", "лес", "город", "поезда", "еда", "чай", "кофе",
    "книги", "кино", "the Moon", "volcanoes", "bees", "chess openings", "the printing press",
)  # fmt: skip


def prompts(n: int) -> list[list[ChatMessage]]:
    return [[ChatMessage("user", f"Расскажи кратко про {TOPICS[i % len(TOPICS)]} ({i}).")] for i in range(n)]


def run_together(
    engine: Engine, group: Sequence[list[ChatMessage]], sampling: SamplingParams
) -> list[list[int]]:
    """The generated token ids of each prompt, all submitted at once."""
    gens: dict[Hashable, Generation] = {}
    for i, messages in enumerate(group):
        gens[i] = engine.generation(engine.prepare(messages), sampling)
        engine.scheduler.submit(i, gens[i])
    while not engine.scheduler.idle:
        engine.scheduler.step()
    return [gens[i].tokens for i in range(len(group))]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.determinism", description=__doc__)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    settings = get_settings()
    engine = load_engine(settings.model_copy(update={"worker_slots": args.batch}))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    cases = prompts(args.prompts)
    alone = [run_together(engine, [m], sampling)[0] for m in cases]
    batched: list[list[int]] = []
    for start in range(0, len(cases), args.batch):
        batched += run_together(engine, cases[start : start + args.batch], sampling)
    diffs = [first_difference(a, b) for a, b in zip(alone, batched, strict=True)]
    differing = [d for d in diffs if d is not None]
    result = {
        "model": settings.model_id,
        "engine": engine.loaded.backend,
        "dtype": engine.loaded.dtype,
        "prompts": len(cases),
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "differ": len(differing),
        "first_differing_token": sorted(differing),
        "median_first_differing_token": statistics.median(differing) if differing else None,
    }
    print(json.dumps(result, indent=2))  # the report; the log has the rest
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
