"""The machine a run came from: CPU model, cores, memory, library versions, dtype."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers


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


def describe(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }


def one_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']}, "
        f"transformers {info['transformers']}, {info['device']} {info['dtype']}"
    )
