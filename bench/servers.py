"""The other HTTP servers compared with the service: the seed-like app and llama.cpp's server."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

import httpx

from bench import workload
from bench.clients import run_clients
from bench.memory import tree_rss_mib
from bench.metrics import BatchResult
from bench.report import SEED_LIKE, llama_server_name
from model.loading import resolve_source
from tests.processes import BIN, Service, free_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
# llama.cpp's server gets one KV pool of SmolLM2's trained context shared by its slots
# (`--kv-unified`), as a worker sizes its own (model/llamacpp_backend.py): any one request may
# then use the whole context, as the interference scenario's 3,500-token prompt needs, instead of
# ctx-size / parallel tokens per slot.
LLAMA_SERVER_CTX = 8192


def log_name(system: str) -> str:
    """A file name for a system's name: "llama.cpp server --parallel 4" -> "llama.cpp-server-parallel-4"."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", system).strip("-")


class HttpServer:
    """One server process on a free port, driven with the same streamed chat request."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_dir: Path,
        model: str | None = None,
        clients: Collection[int] | None = None,
    ) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.model = model
        self.clients = clients  # the client counts it is measured at; None: all
        self.proc = Service(log_name(name), argv, {}, log_dir)
        self.proc.start_or_stop(self._ready, timeout=READY_TIMEOUT_S)

    def _ready(self) -> bool:
        r = httpx.get(f"{self.url}/health", timeout=2)
        return r.status_code == 200 and r.json().get("status") == "ok"

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult:
        url = f"{self.url}/v1/chat/completions"
        wall, samples = run_clients(url, workload.request_body(self.model), concurrency, requests)
        return BatchResult(self.name, concurrency, round_no, wall, samples)

    def rss_mib(self) -> float:
        return tree_rss_mib(self.proc.proc.pid)

    def stop(self) -> None:
        self.proc.stop()


def start_seed_like(log_dir: Path) -> HttpServer:
    port = free_port()
    argv = [str(BIN / "uvicorn"), "bench.seed_like:app", "--host", "127.0.0.1", "--port", str(port)]
    # The seed's design runs transformers' generate(), whatever engine the workers use.
    return HttpServer(SEED_LIKE, argv, port, log_dir)


# Where `make llama-server` (bench/build_llama_server.sh) puts its build.
BUILT = Path(__file__).resolve().parent.parent / ".bench" / "llama.cpp" / "bin" / "llama-server"


def llama_server_binary() -> str | None:
    """`LLAMA_SERVER`, else one on PATH, else the one `make llama-server` built."""
    if explicit := os.environ.get("LLAMA_SERVER"):
        return explicit
    return shutil.which("llama-server") or (str(BUILT) if BUILT.is_file() else None)


def llama_server_unavailable(model_id: str) -> str | None:
    """Why llama.cpp's server cannot be compared here, or None when it can."""
    if llama_server_binary() is None:
        return "no `llama-server` (`make llama-server` builds one; a benchmark peer, never a dependency)"
    if resolve_source(model_id).kind != "gguf":
        return f"MODEL_ID {model_id} is not a GGUF file"
    return None


def start_llama_server(
    model_id: str, log_dir: Path, slots: int, threads: int, clients: Collection[int] | None = None
) -> HttpServer:
    """llama.cpp's server on the same GGUF the workers convert, with a slot per client."""
    source = resolve_source(model_id)
    assert source.gguf_file is not None
    port = free_port()
    binary = llama_server_binary() or "llama-server"
    argv = [
        binary,
        "-m", str(Path(source.location) / source.gguf_file),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(slots),
        "--cont-batching",
        "--ctx-size", str(LLAMA_SERVER_CTX),
        "--kv-unified",
        "--threads", str(threads),
    ]  # fmt: skip
    return HttpServer(llama_server_name(slots), argv, port, log_dir, clients=clients)
