"""Per-session KV cache handed to the model's own attention modules.

The attention code calls `cache.update(key, value, layer_idx, ...)` with this step's keys/values
([batch, kv_heads, new_tokens, head_dim]) and attends over what it returns (the whole past plus them).
Slots are absolute positions in the session's stream, padding included; `valid[b, slot]` says whether a
slot holds a real token (left padding does not), which the mask builder needs.

Storage grows geometrically as the session grows; nothing is reserved for the worst case up front.
"""

from __future__ import annotations

import torch

from swarm.spans import Span


class KVCache:
    """Keys and values of one session on one span. Mutated only by `update` (per layer) and `commit`."""

    def __init__(self, span: Span, batch_size: int, max_length: int):
        self.span = span
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0  # slots already committed
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool)
        self._keys: list[torch.Tensor | None] = [None] * span.length
        self._values: list[torch.Tensor | None] = [None] * span.length
        self._pending = 0

    def begin(self, new_valid: torch.Tensor) -> None:
        """Start a step that appends `new_valid.shape[1]` slots ([batch, new] bool)."""
        self._pending = new_valid.shape[1]
        self.valid = torch.cat([self.valid[:, : self.length], new_valid.to(torch.bool).cpu()], dim=1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's K/V for global block `layer_idx`; return the full K/V up to the step's end."""
        i = layer_idx - self.span.start
        end = self.length + key.shape[2]
        stored = self._keys[i]
        if stored is None or stored.shape[2] < end:
            capacity = min(self.max_length, max(end, 2 * (0 if stored is None else stored.shape[2]), 16))
            self._keys[i] = self._grow(self._keys[i], key, capacity)
            self._values[i] = self._grow(self._values[i], value, capacity)
        self._keys[i][:, :, self.length : end] = key
        self._values[i][:, :, self.length : end] = value
        return self._keys[i][:, :, :end], self._values[i][:, :, :end]

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = like.shape
        new = like.new_zeros(batch, heads, capacity, dim)
        if old is not None:
            new[:, :, : self.length] = old[:, :, : self.length]
        return new

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def rollback(self) -> None:
        """Forget an uncommitted step (its K/V slots are simply overwritten later)."""
        self._pending = 0
        self.valid = self.valid[:, : self.length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values if t is not None)

    # Attribute some transformers attention code reads; we never compile or offload this cache.
    is_compileable = False
