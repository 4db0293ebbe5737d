"""A seed-like single-process server: one FastAPI app, the model in-process, `generate` on a thread
per request streamed through `TextIteratorStreamer`, as the original service did (shared/seed.md).

Only for comparison in `make bench`: `uvicorn bench.seed_like:app`. It loads the same weights in
the same dtype as a worker (through `model.loading`) so that only the serving design differs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import TextIteratorStreamer

from model.loading import LoadedModel, load_model
from tasks.settings import get_settings

_loaded: LoadedModel | None = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global _loaded
    s = get_settings()
    # transformers whatever the workers run: the seed's design is generate() on a thread.
    _loaded = load_model(
        s.model_id,
        engine="transformers",
        device=s.device,
        dtype=s.dtype,
        use_4bit=s.use_4bit,
        cache_dir=s.model_cache_dir,
    )
    yield


app = FastAPI(lifespan=lifespan)


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    messages: list[Message]
    max_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    stream: bool = False
    # --- not in the OpenAI spec: generate exactly max_tokens (as min_new_tokens does) ---
    ignore_eos: bool = False


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok" if _loaded is not None else "loading"}


@app.post("/v1/chat/completions")
def chat(request: ChatRequest) -> StreamingResponse:
    """Streamed only: the benchmark needs nothing else."""
    assert _loaded is not None
    tokenizer, model = _loaded.tokenizer, _loaded.model
    ids = tokenizer.apply_chat_template(
        [m.model_dump() for m in request.messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    input_ids = torch.tensor([ids], device=_loaded.device)
    # A bounded wait: a generation thread that died ends the stream instead of hanging it.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "streamer": streamer,
        "max_new_tokens": request.max_tokens,
        "pad_token_id": tokenizer.eos_token_id,
    }
    if request.ignore_eos:
        kwargs["min_new_tokens"] = request.max_tokens
    if request.temperature > 0:
        kwargs |= {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
    else:
        kwargs["do_sample"] = False
    result: dict[str, int] = {}

    def generate() -> None:
        out = model.generate(**kwargs)
        result["completion_tokens"] = int(out.shape[1] - input_ids.shape[1])

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    return StreamingResponse(_events(streamer, thread, result, len(ids)), media_type="text/event-stream")


def _events(
    streamer: TextIteratorStreamer, thread: threading.Thread, result: dict[str, int], prompt_tokens: int
) -> Iterator[str]:
    """A sync generator: Starlette iterates it on its thread pool, so the event loop stays free."""
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for text in streamer:
        if text:
            yield chunk({"content": text})
    thread.join(timeout=60)
    completion = result.get("completion_tokens", 0)
    yield chunk({}, finish="length")
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    yield chunk({}, usage=usage)
    yield "data: [DONE]\n\n"
