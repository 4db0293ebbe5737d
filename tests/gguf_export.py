"""Export a tiny Hugging Face Llama with a Llama-3 tokenizer to an F32 GGUF, as convert_hf_to_gguf.py would."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCH = gguf.MODEL_ARCH.LLAMA


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows rotate-half per head; llama.cpp's RoPE wants the two halves interleaved."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    # transformers 5 moved rope_theta into rope_parameters; older config.json files have it at the top.
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def tokenizer_digest_path(gguf_file: Path) -> Path:
    """Beside each export: a digest of every tokenizer field written into it (tests/tiny_llama.py
    shares one tokenizer conversion between GGUFs whose digests are equal)."""
    return gguf_file.with_name(gguf_file.name + ".tokenizer-sha256")


def _add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> str:
    """Write the tokenizer fields; return their digest."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    entries: dict[int, tuple[str, gguf.TokenType]] = {
        i: (token, gguf.TokenType.NORMAL) for token, i in tokenizer["model"]["vocab"].items()
    }
    for added in tokenizer["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        entries[added["id"]] = (added["content"], kind)
    # The token list must match the embedding rows: ids past vocab_size (Llama-3.2's <|image|>) are
    # dropped and holes padded, like convert_hf_to_gguf's get_vocab_base().
    tokens = [entries.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([token for token, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    # The tests need a GGUF without a chat template, so the service falls back to its built-in one.
    special.chat_template = None
    special.add_to_gguf(writer, quiet=True)
    written = {
        "model": "gpt2",
        "pre": "llama-bpe",
        "tokens": tokens,
        "merges": special.merges,
        "special_token_ids": special.special_token_ids,
        "add_special_token": special.add_special_token,
        "chat_template": special.chat_template,
    }
    return hashlib.sha256(json.dumps(written, sort_keys=True, default=int).encode()).hexdigest()


def _add_tensors(writer: gguf.GGUFWriter, hf_dir: Path, config: dict[str, Any]) -> None:
    """Every saved tensor under its llama.cpp name; tied embeddings save no lm_head, so none is written
    and llama.cpp reuses token_embd as the output."""
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(ARCH, config["num_hidden_layers"])
    for path in sorted(hf_dir.glob("*.safetensors")):
        for hf_name, tensor in load_file(path).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r}")
            data = tensor.astype(np.float32)
            if name.endswith("attn_q.weight"):
                data = _permute(data, n_head)
            elif name.endswith("attn_k.weight"):
                data = _permute(data, n_head_kv)
            writer.add_tensor(name, data)


def export_gguf(hf_dir: Path, out_file: Path) -> Path:
    """Write the tiny Hugging Face Llama saved at hf_dir (safetensors weights, config.json, and the real
    Llama-3 tokenizer.json/tokenizer_config.json) as an F32 GGUF that llama.cpp loads."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[ARCH])
    _add_hparams(writer, config)
    digest = _add_vocab(writer, hf_dir, config["vocab_size"])
    _add_tensors(writer, hf_dir, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer_digest_path(out_file).write_text(digest)
    return out_file
