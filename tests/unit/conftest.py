"""Fixtures: the real Llama-3 tokenizer and tiny Llamas (tests/tiny_llama.py) whose greedy output is
scripted by construction, loaded by each backend: transformers from its Hugging Face directory,
llama.cpp from a GGUF export. Each model is built once per session, whatever asks for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.engine import Engine
from model.loading import llama_cpp_installed, load_model
from model.prefill import PrefillPolicy
from model.types import Backend
from tests.needs import hidden, missing
from tests.tiny_llama import (
    GGUF_NAME,
    Script,
    TinyLlamas,
    build_scripted_llama3,
    gguf_for_worker,
    llama3_tokenizer_path,
    random_llama3,
)

__all__ = ["GGUF_NAME", "Script", "build_scripted_llama3", "random_llama3"]

BACKENDS: tuple[Backend, ...] = ("transformers", "llama.cpp")

# Cyrillic, an emoji split over three byte-level tokens, punctuation: 12 distinct token ids.
SCRIPT = "Привет, мир! 🚀 Как дела?"


def needs_backend(backend: Backend) -> None:
    if backend == "llama.cpp" and (hidden("llama-cpp-python") or not llama_cpp_installed()):
        missing("llama-cpp-python", "pip install -e '.[llamacpp]'; make install-dev does")


def model_id(path: Path, cache_dir: Path, backend: Backend) -> str:
    """The MODEL_ID a worker would load for a saved test model: the directory for transformers, its
    GGUF export for llama.cpp, whose tokenizer conversion is then in `cache_dir` already (one per
    distinct tokenizer in a session, tests/tiny_llama.py)."""
    return str(gguf_for_worker(path, cache_dir)) if backend == "llama.cpp" else str(path)


def batch_engine(
    path: Path, cache: Path, backend: Backend, slots: int, prefill: PrefillPolicy | None = None
) -> Engine:
    """Load a saved test model the way a worker with WORKER_SLOTS=`slots` does, on CPU:
    transformers in float32 from the directory, llama.cpp from the GGUF export (F32 weights)."""
    needs_backend(backend)
    loaded = load_model(
        model_id(path, cache, backend),
        engine=backend,
        device="cpu",
        dtype="float32",
        use_4bit=False,
        slots=slots,
        cache_dir=cache,
        prefill=prefill,
    )
    return Engine(loaded)


def load_engine(path: Path, cache_dir: Path, backend: Backend = "transformers") -> Engine:
    """A saved test model loaded with one slot, as the default worker loads it."""
    return batch_engine(path, cache_dir, backend, slots=1)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return llama3_tokenizer_path()


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def _scripted_llama3(tiny_llamas: TinyLlamas) -> tuple[Path, Script]:
    return tiny_llamas.scripted(SCRIPT)


@pytest.fixture(scope="session")
def llama3_dir(_scripted_llama3: tuple[Path, Script]) -> Path:
    """A Hugging Face directory: scripted tiny Llama weights, the real Llama-3 tokenizer, no chat template."""
    return _scripted_llama3[0]


@pytest.fixture(scope="session")
def script(_scripted_llama3: tuple[Path, Script]) -> Script:
    return _scripted_llama3[1]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every engine test runs on both backends: the same script, tokens and text from each."""
    needs_backend(request.param)
    return request.param  # type: ignore[no-any-return]


# The weights' init spread of the batching tests' random model, by engine. transformers computes
# a sequence's logits exactly the same batched or alone, so those tests use sharp attention
# (0.1), where a wrong mask, position, padded row or shared KV changes the greedy tokens.
# llama.cpp's CPU kernels are not bit-identical across batch sizes even in F32 (rounding-level
# differences): at 0.1, sampled and very long greedy runs reach a near-tie that rounding tips;
# at the default 0.02 the margins stay wider than that noise, while a sequence attending to
# another slot's cells, or at a wrong position, still changes its text.
BATCH_INIT_RANGE: dict[Backend, float] = {"transformers": 0.1, "llama.cpp": 0.02}


@pytest.fixture(scope="session")
def batch_llama3_dir(tiny_llamas: TinyLlamas, backend: Backend) -> Path:
    """A tiny Llama with random weights, so attention really mixes positions (and slots, if it
    leaked across them), with the real Llama-3 tokenizer; 1024 positions, room for a prompt of
    several prefill chunks. One per engine for the whole session."""
    path, _ = tiny_llamas.random(context_length=1024, seed=2, initializer_range=BATCH_INIT_RANGE[backend])
    return path


@pytest.fixture(scope="session")
def engine(llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return load_engine(llama3_dir, model_cache, backend)


@pytest.fixture(scope="session")
def scripted_engine(
    backend: Backend, model_cache: Path, tiny_llamas: TinyLlamas
) -> Callable[..., tuple[Engine, Script]]:
    """Build (once for both engines) and load a variant scripted model on demand, e.g. one that
    ends its turn differently."""
    loaded: dict[tuple[str, str], tuple[Engine, Script]] = {}

    def make(text: str, end_token: str = "<|eot_id|>") -> tuple[Engine, Script]:
        if (text, end_token) not in loaded:
            path, script = tiny_llamas.scripted(text, end_token)
            loaded[text, end_token] = (load_engine(path, model_cache, backend), script)
        return loaded[text, end_token]

    return make
