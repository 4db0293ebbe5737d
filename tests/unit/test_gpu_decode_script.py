"""bench/gpu_decode.py, the GPU decode benchmark, runs as it is: its --dry-run takes every code path
(model build in bf16-like and NF4, the engine's step, generate's baseline, the floor) on a tiny
Llama on the CPU. Its figures need a CUDA GPU; none has run it here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu_decode
from tests import needs

pytestmark = pytest.mark.timeout(120)


def test_the_gpu_script_dry_runs_every_cell_on_the_cpu(tmp_path: Path) -> None:
    needs.module("bitsandbytes", "a dependency on Linux: pip install -e .")
    report = gpu_decode.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").is_file()
    cells = {(r["precision"], r["slots"], r["context"]) for r in report["rows"]}
    assert report["targets"] == {}  # no 32-slot cell in a dry run
    assert cells == {(p, s, c) for p in ("bf16", "nf4") for s in (1, 2) for c in (16, 32)}
    # Two steps on a shared CPU measure nothing (generate's difference of two timings can even
    # come out negative): only that every figure is there.
    for row in report["rows"]:
        assert row["step_ms"] > 0 and row["floor_ms"] >= 0 and isinstance(row["generate_step_ms"], float)
        # The graphs' padded shapes, run eagerly on the CPU, pick the tokens the eager step picks.
        assert row["graphs_tokens_match"] and not row["graphs_replayed"]


def test_the_floor_counts_weights_but_the_embedding_and_every_rows_kv() -> None:
    import torch

    model = gpu_decode.build(gpu_decode.TINY, 64, torch.device("cpu"), torch.float32, nf4=False)
    c = model.config
    embedding = c.vocab_size * c.hidden_size * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    assert gpu_decode.weight_bytes(model) == total - embedding
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert gpu_decode.kv_bytes(model, slots=3, context=10) == 3 * 10 * per_token


def test_the_targets_take_the_faster_of_eager_and_graphs_that_agree() -> None:
    def row(slots: int, eager: float, graphs: float, match: bool = True) -> dict[str, object]:
        return {
            "precision": "bf16",
            "context": 512,
            "slots": slots,
            "step_ms": eager,
            "graphs_step_ms": graphs,
            "graphs_tokens_match": match,
            "floor_ms": 5.0,
            "generate_step_ms": 25.0,
        }

    targets = gpu_decode.targets([row(1, 10.0, 6.25), row(32, 8.0, 1.0, match=False)])
    assert targets == {
        "bf16 @ 512": {
            "single_of_floor": 0.8,  # 5 / 6.25: graphs, whose tokens agree
            "single_vs_generate": 4.0,
            "32_slots_vs_generate": 3.12,  # 25 / 8: eager, since the graphs' tokens differ
            "32_slots_over_one_aggregate": 25.0,
        }
    }


def test_the_script_refuses_a_transformers_older_than_the_project_takes() -> None:
    # A lent GPU machine came with transformers 5.17, whose models take the KV cache as
    # `past_key_values`: SlotBatch's store would go unused.
    assert gpu_decode._older("5.17.0", gpu_decode.MIN_TRANSFORMERS)
    assert gpu_decode._older("4.57.1", gpu_decode.MIN_TRANSFORMERS)
    assert not gpu_decode._older("5.24.0", gpu_decode.MIN_TRANSFORMERS)
    assert not gpu_decode._older("5.25.0.dev0", gpu_decode.MIN_TRANSFORMERS)
    assert not gpu_decode._older("6.0.0", gpu_decode.MIN_TRANSFORMERS)
