"""The transformers backend: weights in torch on CUDA (bf16 or 4-bit NF4), MPS or CPU."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from model.loading import LoadedModel, ModelSource, gguf_conversion, load_tokenizer
from model.types import SamplingParams, StepOutput

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
) -> LoadedModel:
    """Load weights once; GGUF files are dequantized once and cached on disk as safetensors."""
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

    model: Any = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if quantization is None:
        model.to(target)
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    eos = model.generation_config.eos_token_id
    return LoadedModel(
        backend="transformers",
        model=model,
        tokenizer=tokenizer,
        runner=TorchBatch(model, target, slots),
        eos_token_ids=frozenset([eos] if isinstance(eos, int) else eos or ()),
        device=str(target),
        dtype=str(torch_dtype).removeprefix("torch."),
        quantization=quantization,
        context_length=int(context),
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


@dataclass
class _Seq:
    sampler: _Sampler
    pending: list[int]  # tokens to feed next: the whole prompt, then each sampled token
    cache: Any = None


class TorchBatch:
    """The decode loop on a transformers model: one forward per sequence and token, over its own
    growing KV cache (batched forward passes come next).

    Written out rather than delegated to `model.generate` so that every token passes through the
    engine, where cancellation, stop strings and detokenization are decided, without a streamer
    thread competing with the compute threads on small machines.
    """

    def __init__(self, model: Any, device: torch.device, slots: int) -> None:
        self._model = model
        self._device = device
        self._seqs: dict[int, _Seq] = {}
        self._capacity = slots

    @property
    def capacity(self) -> int:
        return self._capacity

    def can_admit(self, positions: int) -> bool:
        return len(self._seqs) < self._capacity

    def add(self, prompt: Sequence[int], sampling: SamplingParams, positions: int) -> int:
        slot = next(i for i in range(self._capacity) if i not in self._seqs)
        self._seqs[slot] = _Seq(_Sampler(sampling), list(prompt))
        return slot

    def drop(self, slot: int) -> None:
        self._seqs.pop(slot, None)

    def step(self) -> StepOutput:
        out = StepOutput()
        with torch.inference_mode():
            for slot, seq in self._seqs.items():
                input_ids = torch.tensor([seq.pending], device=self._device)
                result = self._model(input_ids=input_ids, cache=seq.cache, use_cache=True)
                seq.cache = result.cache
                token = seq.sampler(result.logits[:, -1, :])
                seq.pending = [token]
                out.tokens[slot] = token
        return out


class _Sampler:
    """Greedy at temperature 0; otherwise temperature and nucleus sampling, seeded per request."""

    def __init__(self, sampling: SamplingParams) -> None:
        self._greedy = sampling.greedy
        self._temperature = sampling.temperature
        self._top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None
        self._generator: torch.Generator | None = None
        if sampling.seed is not None and not self._greedy:
            # CPU generator: MPS has none, and CPU draws make a seed mean the same on every device.
            self._generator = torch.Generator("cpu").manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self._greedy:
            return int(logits.argmax(dim=-1).item())
        scores = logits.float() / self._temperature
        if self._top_p is not None:
            scores = self._top_p(None, scores)  # type: ignore[arg-type]  # input_ids unused
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
