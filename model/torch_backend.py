"""The transformers backend: weights in torch on CUDA (bf16 or 4-bit NF4), MPS or CPU."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from model.loading import LoadedModel, ModelSource, gguf_conversion, load_tokenizer
from model.slot_batch import SlotBatch

log = logging.getLogger(__name__)


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


def load(
    source: ModelSource,
    *,
    device: str,
    dtype: str,
    use_4bit: bool,
    threads: int,
    slots: int,
    cache_dir: Path,
    quantize_on_cpu: bool = False,
) -> LoadedModel:
    """Load weights once; GGUF files are dequantized once and cached on disk as safetensors.

    The batch runner is SlotBatch: KV allocated once and written in place.

    `use_4bit` quantizes to bitsandbytes NF4 on CUDA only, where it pays. `quantize_on_cpu` is
    for tests alone (never set from settings): bitsandbytes also runs NF4 on CPU, slowly, which
    lets a machine without a GPU exercise the quantized model's code path.
    """
    started = time.perf_counter()
    if threads:
        # Several workers on one CPU machine must split its cores, or they thrash each other.
        torch.set_num_threads(threads)
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    tokenizer = load_tokenizer(source, cache_dir)
    location = source.location
    if source.kind == "gguf":
        location = str(gguf_conversion(source, cache_dir, "weights", lambda d: _dequantize(source, d)))

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    quantization = None
    if use_4bit and (target.type == "cuda" or (quantize_on_cpu and target.type == "cpu")):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
        quantization = "bnb-nf4"
    elif use_4bit:
        log.info("USE_4BIT applies to CUDA only; loading unquantized on %s", target.type)

    model: Any = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if quantization is None:
        model.to(target)
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
    eos = model.generation_config.eos_token_id
    return LoadedModel(
        backend="transformers",
        model=model,
        tokenizer=tokenizer,
        runner=SlotBatch(model, target, slots, context),
        eos_token_ids=frozenset([eos] if isinstance(eos, int) else eos or ()),
        device=str(target),
        dtype=str(torch_dtype).removeprefix("torch."),
        quantization=quantization,
        context_length=context,
        threads=torch.get_num_threads(),
        load_seconds=time.perf_counter() - started,
    )


def _dequantize(source: ModelSource, staging: Path) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The weights are plain tensors once dequantized, but the GGUF quantizer stays attached and
    # refuses to serialize; detach it so the copy saves (and later loads) as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
