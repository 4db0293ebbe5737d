"""The machine a run came from: CPU model, cores, memory, library versions, dtype."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import transformers

from model.loading import LoadedModel


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every number here."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": transformers.__version__,
        "llama_cpp_python": _version("llama-cpp-python"),
        "engine": loaded.backend,
        "threads": loaded.threads,
        "device": loaded.device,
        "dtype": loaded.dtype,
    }


def one_line(info: dict[str, Any]) -> str:
    engine = info.get("engine", "transformers")
    version = f"llama-cpp-python {info.get('llama_cpp_python')}" if engine == "llama.cpp" else ""
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; engine {engine} "
        f"{version}{', ' if version else ''}torch {info['torch']}, transformers {info['transformers']}; "
        f"{info['device']} {info['dtype']}"
    )
