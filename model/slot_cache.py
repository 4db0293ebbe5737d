"""KV memory allocated once for every slot of a batch, written in place at each row's own position.

A transformers `Cache` whose layers each hold one key and one value tensor of shape
[slots, kv_heads, capacity, head_dim]. Slot `i`'s sequence owns row `i`: its prefill chunks and
then each decoded token are written at its own positions (an indexed copy of the new columns
only), so a step never reallocates or copies the KV of other rows, a sequence joining writes only
its own row, and one leaving is just a row nobody reads any more.

The caller (model/slot_batch.py) plans each forward before running it (`plan_decode` or
`plan_prefill`): which rows take part, where each writes, and up to which column each attends.
The plan returns the 4-D boolean attention mask to pass to the model, which transformers'
masking hands to SDPA as it is. Attention reads the columns up to the forward's longest row
only (`width`), not the whole allocation, so short contexts stay cheap.

Capacity grows in chunks of CHUNK_POSITIONS, at least doubling, up to the model's context: a
handful of copies in a sequence's life, never one per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

CHUNK_POSITIONS = 256


@dataclass(frozen=True)
class Plan:
    """Where one forward writes and what it reads: rows `rows` of the store take part, row `index[b]`
    writes its query `j` at column `positions[b, j]`, and attention reads columns [0, width)."""

    rows: slice
    index: torch.Tensor  # [batch, 1]
    positions: torch.Tensor  # [batch, queries]
    width: int


def capacity_for(positions: int, capacity: int, limit: int) -> int:
    """The allocation that holds `positions` columns: whole chunks, at least double the current
    one (so growing costs O(log) copies over a sequence's life), never above `limit`."""
    if positions <= capacity:
        return capacity
    if positions > limit:
        raise ValueError(f"{positions} positions exceed the context of {limit}")
    chunks = -(-positions // CHUNK_POSITIONS) * CHUNK_POSITIONS
    return min(max(chunks, 2 * capacity), limit)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot of its SlotCache."""

    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Heads, head size, dtype and device come from the first keys written (with 4-bit weights
        # the activations' dtype is the compute dtype, not the weights').
        slots, capacity = self._owner.slots, self._owner.capacity
        self.keys = key_states.new_zeros((slots, key_states.shape[1], capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((slots, value_states.shape[1], capacity, value_states.shape[3]))
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        if not self.is_initialized:
            return  # allocated at the new capacity when first written
        assert self.keys is not None and self.values is not None
        old = self.keys.shape[2]
        keys = self.keys.new_zeros((*self.keys.shape[:2], capacity, self.keys.shape[3]))
        values = self.values.new_zeros((*self.values.shape[:2], capacity, self.values.shape[3]))
        keys[:, :, :old] = self.keys
        values[:, :, :old] = self.values
        self.keys, self.values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        plan = self._owner.plan
        assert plan is not None, "SlotCache used in a forward that was not planned"
        # [batch, heads, queries, dim] -> [batch, queries, heads, dim]: the shape the two index
        # tensors (row, position), separated by the heads slice, select.
        self.keys[plan.index, :, plan.positions] = key_states.transpose(1, 2)
        self.values[plan.index, :, plan.positions] = value_states.transpose(1, 2)
        # Views, not copies: the rows taking part are contiguous and the width a prefix.
        return self.keys[plan.rows, :, : plan.width], self.values[plan.rows, :, : plan.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The planned 4-D mask goes to the model as it is; these sizes only describe it.
        plan = self._owner.plan
        return (plan.width if plan is not None else query_length), 0

    def get_seq_length(self) -> int:
        plan = self._owner.plan
        return plan.width if plan is not None else 0

    def get_max_length(self) -> int:
        return self._owner.max_positions


class SlotCache(Cache):
    """Every slot's KV, one SlotLayer per model layer; planned before each forward."""

    def __init__(
        self, layers: int, slots: int, max_positions: int, *, additive_mask: torch.dtype | None = None
    ) -> None:
        self.slots = slots
        self.max_positions = max_positions
        self.capacity = 0
        # Counts reallocations, a partial one included: a grow that runs out of memory after some
        # layers leaves `capacity` as it was but those layers' tensors new, and a CUDA graph
        # recorded over the old ones must be dropped all the same.
        self.generation = 0
        self.plan: Plan | None = None
        # SDPA takes a boolean mask (True: attend); eager attention adds a float mask of the
        # activations' dtype to its scores instead (`additive_mask` names that dtype).
        self._additive_mask = additive_mask
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])

    def _slot_layers(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlotLayer)]

    def written(self) -> bool:
        """Whether a forward has written keys into the store."""
        return any(layer.is_initialized for layer in self._slot_layers())

    def reserve(self, positions: int) -> None:
        """Make room for `positions` columns in every row (growing the allocation if needed)."""
        capacity = capacity_for(positions, self.capacity, self.max_positions)
        if capacity != self.capacity:
            self.generation += 1
            for layer in self._slot_layers():
                layer.grow(capacity)
            self.capacity = capacity

    def plan_decode(
        self, writes: list[int], attends: list[int], device: torch.device, width: int = 0
    ) -> torch.Tensor:
        """One new token in each of rows 0..len(writes)-1: row i writes column writes[i] and
        attends to columns 0..attends[i]; attention reads `width` columns, or (if fewer) up to
        the longest row's. The attention mask for the forward."""
        width = max(width, max(attends) + 1)
        self.reserve(max(max(writes) + 1, width))
        rows = len(writes)
        self.plan = Plan(
            rows=slice(0, rows),
            index=torch.arange(rows, device=device).unsqueeze(1),
            positions=torch.tensor(writes, device=device).unsqueeze(1),
            width=width,
        )
        columns = torch.arange(width, device=device)
        upto = torch.tensor(attends, device=device)
        return self._mask((columns.unsqueeze(0) <= upto.unsqueeze(1))[:, None, None, :])

    def plan_prefill(self, slot: int, start: int, count: int, device: torch.device) -> torch.Tensor:
        """`count` prompt tokens into row `slot` from column `start`, each attending causally to
        the row's columns before it. The attention mask for the forward."""
        width = start + count
        self.reserve(width)
        positions = torch.arange(start, width, device=device)
        self.plan = Plan(
            rows=slice(slot, slot + 1),
            index=torch.tensor([[slot]], device=device),
            positions=positions.unsqueeze(0),
            width=width,
        )
        columns = torch.arange(width, device=device)
        return self._mask((columns.unsqueeze(0) <= positions.unsqueeze(1))[None, None])

    def copy_row(self, source: int, target: int, positions: int) -> None:
        """Row `source`'s first `positions` columns into row `target` (a shared prompt's KV)."""
        for layer in self._slot_layers():
            if layer.is_initialized:
                assert layer.keys is not None and layer.values is not None
                layer.keys[target, :, :positions] = layer.keys[source, :, :positions]
                layer.values[target, :, :positions] = layer.values[source, :, :positions]

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self._additive_mask
        if dtype is None:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
