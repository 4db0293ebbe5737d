"""The llama.cpp backend (llama-cpp-python) for GGUF files: quantized kernels on CPU, Metal or CUDA."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import psutil

from model.chat_tokenizer import ChatTokenizer
from model.loading import LoadedModel, ModelNotAvailable, ModelSource, tokenizer_folder
from model.types import SamplingParams

log = logging.getLogger(__name__)


def load(source: ModelSource, *, device: str, threads: int, cache_dir: Path) -> LoadedModel:
    """Memory-map the GGUF as it is (no conversion) and take the tokenizer from the same file."""
    started = time.perf_counter()
    gpu_layers, where = _placement(device)
    threads = threads or _physical_cores()
    tokenizer = ChatTokenizer(tokenizer_folder(source, cache_dir))
    llm = _open(source.gguf_path, threads=threads, gpu_layers=gpu_layers)
    weights = _weight_type(llm.metadata)
    return LoadedModel(
        backend="llama.cpp",
        model=llm,
        tokenizer=tokenizer,
        sample=LlamaCppSampler(llm),
        eos_token_ids=frozenset({llm.token_eos()}),
        device=where,
        dtype=weights,
        quantization=None if weights in ("f32", "f16", "bf16") else f"gguf-{weights}",
        context_length=llm.n_ctx(),
        threads=threads,
        load_seconds=time.perf_counter() - started,
    )


def _open(path: Path, *, threads: int, gpu_layers: int) -> Any:
    """The model with flash attention where llama.cpp supports it for this model and device.

    Flash attention decoded 10% faster on the embedded model on a 2-core CPU (112 vs 102 tok/s),
    and llama-server turns it on by default; llama-cpp-python leaves it off. A model or backend
    that cannot run it fails to create its context, and then loads without it.
    """
    options: dict[str, Any] = {
        "model_path": str(path),
        "n_ctx": 0,  # the context the model was trained for
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": gpu_layers,
        "logits_all": False,  # logits of the last position only: all sampling needs
        "verbose": False,
    }
    try:
        return llama_cpp.Llama(**options, flash_attn=True)
    except ValueError as exc:
        log.warning("llama.cpp could not use flash attention here (%s); loading without it", exc)
        return llama_cpp.Llama(**options, flash_attn=False)


def _placement(device: str) -> tuple[int, str]:
    """Layers to offload and where they run: all on the GPU when the build can, else the CPU."""
    if device == "cpu":
        return 0, "cpu"
    if llama_cpp.llama_supports_gpu_offload():
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return -1, "metal" if apple else "gpu"
    if device != "auto":
        raise ModelNotAvailable(f"DEVICE={device}: this llama-cpp-python build cannot offload to a GPU")
    return 0, "cpu"


def _weight_type(metadata: dict[str, str]) -> str:
    """The GGUF's weight type, e.g. "q4_1" or "f16"."""
    try:
        name = gguf.LlamaFileType(int(metadata["general.file_type"])).name
    except (KeyError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _physical_cores() -> int:
    """llama.cpp's threads spin on shared barriers: one per physical core, as llama-server picks,
    is faster than one per hyper-thread."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LlamaCppSampler:
    """Prefill, then one llama.cpp decode per token, sampled by llama.cpp's own sampler chain.

    Prompt caching: a prompt that starts like the last one (the same system prompt, or a chat's
    earlier turns) reuses the KV cache of that shared prefix, so only the rest is prefilled. Only
    positions that the last request prefilled as a batch are reused, never its generated tokens,
    and the final prompt token is always evaluated on its own: measured on the embedded model,
    that keeps the logits bit-identical to a fresh prefill, so a greedy request gives the same
    text whatever ran before it (tests/unit/test_engine_cache.py checks it).
    """

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._prefilled: list[int] = []  # what positions 0..n-1 of the KV cache hold, batch-evaluated

    def __call__(self, prompt: Sequence[int], sampling: SamplingParams) -> Generator[int, None, None]:
        llm = self._llm
        head, last = list(prompt[:-1]), int(prompt[-1])
        chain = _sampler_chain(sampling)
        try:
            keep = _shared_prefix(self._prefilled, head)
            self._prefilled = head[:keep]  # until the prefill below completes
            llm.n_tokens = keep  # eval() drops every cached position from here on
            if keep < len(head):
                llm.eval(head[keep:])
            self._prefilled = head
            llm.eval([last])
            while True:
                token = int(llama_cpp.llama_sampler_sample(chain, llm.ctx, -1))
                yield token
                llm.eval([token])
        finally:
            llama_cpp.llama_sampler_free(chain)


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _sampler_chain(sampling: SamplingParams) -> Any:
    """Greedy, or temperature then nucleus then a seeded draw: the transformers backend's order."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.greedy:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    if sampling.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value
    if sampling.seed is not None:
        # llama.cpp seeds are 32-bit; keep a user's seed from meaning "random".
        seed = min(sampling.seed & 0xFFFFFFFF, llama_cpp.LLAMA_DEFAULT_SEED - 1)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
