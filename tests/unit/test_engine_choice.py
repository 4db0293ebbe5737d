"""ENGINE=auto|transformers|llama.cpp: which backend serves which MODEL_ID, and the refusals."""

from __future__ import annotations

import pytest

from model import loading
from model.loading import ModelNotAvailable, ModelSource, choose_backend

GGUF = ModelSource("gguf", "/models", "m.gguf")
LOCAL = ModelSource("local", "/models/llama")
HUB = ModelSource("hub", "ruslandev/llama-3-8b-gpt-4o-ru1.0")


@pytest.mark.parametrize(
    ("engine", "source", "device", "installed", "gpu", "expected"),
    [
        ("auto", GGUF, "auto", True, False, "llama.cpp"),
        ("auto", GGUF, "cpu", True, False, "llama.cpp"),
        ("auto", GGUF, "mps", True, False, "llama.cpp"),
        ("auto", GGUF, "auto", True, True, "transformers"),  # CUDA machines keep bf16 / NF4
        ("auto", GGUF, "cuda", True, False, "transformers"),
        ("auto", GGUF, "auto", False, False, "transformers"),  # llama-cpp-python not installed
        ("auto", LOCAL, "auto", True, False, "transformers"),
        ("auto", HUB, "cpu", True, False, "transformers"),
        ("transformers", GGUF, "cpu", True, False, "transformers"),
        ("llama.cpp", GGUF, "cuda", True, True, "llama.cpp"),
    ],
)
def test_choice(
    monkeypatch: pytest.MonkeyPatch,
    engine: loading.EngineChoice,
    source: ModelSource,
    device: str,
    installed: bool,
    gpu: bool,
    expected: str,
) -> None:
    monkeypatch.setattr(loading, "llama_cpp_installed", lambda: installed)
    monkeypatch.setattr(loading, "nvidia_gpu_present", lambda: gpu)
    assert choose_backend(engine, source, device) == expected


@pytest.mark.parametrize(
    ("source", "installed", "message"),
    [(HUB, True, "needs a .gguf"), (LOCAL, True, "needs a .gguf"), (GGUF, False, "needs llama-cpp-python")],
)
def test_forced_llama_cpp_refuses_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, source: ModelSource, installed: bool, message: str
) -> None:
    monkeypatch.setattr(loading, "llama_cpp_installed", lambda: installed)
    with pytest.raises(ModelNotAvailable, match=message):
        choose_backend("llama.cpp", source, "auto")
