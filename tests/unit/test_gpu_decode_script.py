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
