"""The engine's own decode loop (KV cache, sampling) agrees with transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.engine import Engine
from model.types import ChatMessage, Completion, SamplingParams, TextDelta
from tests.unit.conftest import TOKENIZER_FILES, llama3_tokenizer_path

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def random_llama3(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A tiny Llama with random weights: its attention really mixes positions, unlike the scripted one."""
    import shutil

    from tests.unit.conftest import load_engine

    source = llama3_tokenizer_path()
    path = tmp_path_factory.mktemp("random-llama3")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return load_engine(Path(path), tmp_path_factory.mktemp("cache"))


def test_greedy_tokens_match_transformers_generate(random_llama3: Engine) -> None:
    engine = random_llama3
    prompt = engine.prepare([ChatMessage("user", "Расскажи про космос кратко.")])
    items = list(engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0.0)))
    done = items[-1]
    assert isinstance(done, Completion)
    text = "".join(i.text for i in items if isinstance(i, TextDelta))

    model, tokenizer = engine.loaded.model, engine.loaded.tokenizer
    ids = torch.tensor([prompt.token_ids])
    out = model.generate(ids, max_new_tokens=done.completion_tokens, do_sample=False, eos_token_id=None)
    new = out[0, ids.shape[1] :].tolist()
    assert done.completion_tokens == len(new)
    assert text == tokenizer.decode([t for t in new if t not in (128001, 128009)], skip_special_tokens=True)
