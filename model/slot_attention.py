"""Decode attention over a SlotCache in which each row reads only its own columns (CPU).

One masked SDPA call over a decode step's rows reads every row up to the longest row's width:
beside one 1,800-token conversation, three 50-token ones each read 1,800 columns of KV and mask
off 1,750. PyTorch's answers to that are CUDA-only (`torch.nn.attention.varlen.varlen_attn` with
`seqused_k`: the flash kernel; FlexAttention's block masks: compiled Triton), so on the CPU the
step runs one SDPA call per row instead, each over exactly its row's columns and with no mask,
when the padding it avoids outweighs the extra calls (`rows_apart`). On CUDA and MPS a call per
row would be a kernel launch per row and layer (and no CUDA graph could hold the varying
widths), so there the step stays one masked call.

Registered with transformers' AttentionInterface (and SDPA's mask function with its
AttentionMaskInterface) under SLOT_SDPA; without `slot_widths` in the forward's kwargs (prefill,
static shapes, rows of similar lengths, any other caller of the model) it is transformers' SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SLOT_SDPA = "slot_sdpa"

# The padding, in columns per row on average, above which a step attends row by row. A call
# costs about 12 us on the CPU; a column of KV 0.15 us a layer for SmolLM2 (3 KV heads x 64) and
# 1 us for Llama-3-8B (8 x 128), so 128 columns a row repays a call on either; with less padding
# than that one masked call is as fast or faster (bench.kv_cache's mixed-length rows).
ROWS_APART_PADDING = 128


def rows_apart(widths: Sequence[int]) -> bool:
    """Whether rows attending to `widths` columns each should attend one call per row."""
    if len(widths) < 2:
        return False
    padding = len(widths) * max(widths) - sum(widths)
    return padding >= ROWS_APART_PADDING * len(widths)


def slot_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    slot_widths: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, or, given `slot_widths` (one query per row), each row over its
    own first `slot_widths[row]` columns. Output [rows, queries, heads, head_dim], as SDPA's."""
    if slot_widths is None or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # One query per row: the heads sharing a KV head become that head's queries (transformers'
    # pack_gqa), so SDPA reads each KV head once instead of once per query head.
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = torch.empty_like(grouped)
    for row, width in enumerate(slot_widths):
        out[row] = torch.nn.functional.scaled_dot_product_attention(
            grouped[row : row + 1],
            key[row : row + 1, :, :width],
            value[row : row + 1, :, :width],
            scale=scaling,
        )[0]
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(SLOT_SDPA, slot_sdpa)
# Any other caller of the model (generate, the bench's DynamicCache runner) passes a 2-D mask,
# which transformers turns into SDPA's 4-D mask only with SDPA's mask function registered too.
AttentionMaskInterface.register(SLOT_SDPA, sdpa_mask)
