"""The production model's shapes through the real worker: a Llama with Llama-3-8B's hidden size,
heads, KV heads, MLP, 128k vocabulary and rope theta, at one layer with random bf16 weights, streams
a chat completion on the transformers engine's default path (SlotBatch). Catches shape and dtype
mistakes (grouped KV heads, head size 128, bf16 KV) that the tiny models cannot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from tests.integration.conftest import Stack, running_stack
from tests.integration.helpers import sdk
from tests.tiny_llama import LLAMA3_VOCAB_SIZE, save_with_tokenizer

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # builds a 2.5 GB model

# meta-llama/Meta-Llama-3-8B's config.json, but for the layer count and context.
LLAMA3_8B_SHAPES = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": LLAMA3_VOCAB_SIZE,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
SERVED = "llama3-8b-shapes"


def build_llama3_8b_shapes(path: Path, layers: int = 1) -> None:
    """Random weights of those shapes, saved in bf16 (about 2.5 GB at one layer: the embedding
    and the untied lm_head are 1 GB each)."""
    config = LlamaConfig(
        **LLAMA3_8B_SHAPES,
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of 1.3 billion weights
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128009])
    save_with_tokenizer(model, path)
    del model


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    path = tmp_path_factory.mktemp("llama3-8b-shapes")
    build_llama3_8b_shapes(path)
    with running_stack(
        tmp_path_factory.mktemp("shapes-stack"),
        MODEL_ID=str(path),
        SERVED_MODEL_NAME=SERVED,
        ENGINE="transformers",
        DTYPE="bfloat16",
        DEVICE="cpu",
        WORKER_SLOTS="2",
        MODEL_CACHE_DIR=str(model_cache),
    ) as stack:
        yield stack


def test_a_chat_completion_streams_on_the_llama3_8b_shapes(shaped: Stack) -> None:
    stream = sdk(shaped).chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "Привет! Как дела?"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas, "no text streamed"
