"""Static shapes for SlotBatch's decode step, and CUDA graphs of it (CUDA only).

A CUDA graph replays one recorded sequence of kernels on fixed buffers, so the step costs one
launch instead of hundreds (eager transformers decoding of an 8B model is launch-bound: about
25 ms a step on an H100 whatever the batch). It needs every shape fixed: the rows the forward
runs are rounded up to a bucket (ROW_BUCKETS, padding rows masked as SlotBatch's other
non-decoding rows), and the columns attention reads up to a power of two (from CHUNK_POSITIONS),
so a handful of graphs cover every batch. Graphs are captured on first use of a bucket, share one
memory pool, and are dropped when the KV store grows, even a grow that ran out of memory after
some layers (their recorded addresses are the old ones).

The bucket choice runs on every device (`SlotBatch(static_shapes=True)` on a CPU runs the same
padded shapes eagerly, which is how the tests check them); capture and replay run on CUDA only,
and only when asked (`graphs=True`). Capture failing (an operation that cannot be captured, say
in a quantized layer) falls back to eager for good, with one warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from model.slot_cache import CHUNK_POSITIONS, Plan, SlotCache

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def row_bucket(rows: int, slots: int) -> int:
    """The rows a decode forward runs for `rows` in use: the next bucket, never above the slots."""
    return min(next(b for b in (*ROW_BUCKETS, slots) if b >= rows), slots)


def width_bucket(width: int, limit: int) -> int:
    """The columns attention reads for a longest row of `width`: the next power of two from
    CHUNK_POSITIONS, never above the context."""
    bucket = CHUNK_POSITIONS
    while bucket < width:
        bucket *= 2
    return min(bucket, limit)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    index: torch.Tensor  # [rows, 1]: 0..rows-1, the rows written
    tokens: torch.Tensor  # [rows, 1]
    positions: torch.Tensor  # [rows, 1]
    mask: torch.Tensor  # [rows, 1, 1, width]
    logits: torch.Tensor  # [rows, 1, vocab], written by each replay


class DecodeGraphs:
    """The decode forward of one SlotBatch, as one CUDA graph per (rows, width) bucket."""

    def __init__(self, model: Any, cache: SlotCache) -> None:
        self._model = model
        self._cache = cache
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._generation = -1
        self._pool: Any = None
        self.broken = False  # capture failed once: eager from then on

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The logits ([rows, 1, vocab]) of the planned step, by replay; None when there is no
        graph to replay (capture failed): the caller runs the step eagerly."""
        if self.broken:
            return None
        if self._cache.generation != self._generation:  # the store was reallocated, even in part
            self._graphs.clear()
            self._generation = self._cache.generation
        key = (tokens.shape[0], mask.shape[-1])
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(tokens, positions, mask)
            except Exception as exc:  # any capture error: never retried, the step runs eager
                log.warning("CUDA graph capture of the decode step failed; eager from now on: %s", exc)
                self.broken = True
                self._graphs.clear()
                return None
            self._graphs[key] = captured
        captured.tokens.copy_(tokens)
        captured.positions.copy_(positions)
        captured.mask.copy_(mask)
        captured.graph.replay()
        return captured.logits

    def _run(self, captured: _Captured) -> torch.Tensor:
        plan = self._cache.plan
        assert plan is not None
        # The graph records the writes through these buffers: a replay writes where they say.
        self._cache.plan = Plan(plan.rows, captured.index, captured.positions, plan.width)
        result = self._model(
            input_ids=captured.tokens,
            attention_mask=captured.mask,
            position_ids=captured.positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return result.logits  # type: ignore[no-any-return]

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> _Captured:
        plan = self._cache.plan
        assert plan is not None
        captured = _Captured(
            None, plan.index.clone(), tokens.clone(), positions.clone(), mask.clone(), tokens.new_empty(0)
        )
        # Warm-up on a side stream, as torch.cuda.graph's documentation asks: lazy initialization
        # and autotuning happen outside the capture. It computes the same step, so what it writes
        # is what the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(captured)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            captured.logits = self._run(captured)
        captured.graph = graph
        return captured
