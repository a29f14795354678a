"""KV memory: a byte budget handed out in pages, and the per-session cache that draws on it.

`KVBudget` is the peer's KV memory in bytes. A session's `KVCache` holds, for each block of its span,
keys and values as [rows, kv_heads, capacity, head_dim] tensors whose capacity is a whole number of
pages (`page_tokens` token slots per row); it takes pages from the budget as the session grows and gives
them all back on `free()`. Nothing is reserved for the session's worst case. The attention reads each
block's storage in place (a view up to the current length), so a step copies only its new K/V; storage
is copied only when it grows, by at least 1/16 of its size, so growth costs O(1) per token amortized
and the capacity stays within 1/16 (+ one page) of what is used.

Slots are absolute positions in the session's stream, padding included; `valid[row, slot]` says
whether a slot holds a real token (left padding does not), which the mask builder needs.

Thread use: the peer's compute thread mutates caches; `KVBudget` is locked, so the event loop may read
it (and free a cache that no step is running on) at any time.
"""

from __future__ import annotations

import math
import threading

import torch

from swarm.spans import Span

GROWTH_FRACTION = 16  # grow by at least capacity / GROWTH_FRACTION


class CacheFull(Exception):
    """The budget has no room for the pages a step needs (the step waits; nothing is evicted)."""


class KVBudget:
    """Bytes of KV memory a peer may hold, shared by all its sessions."""

    def __init__(self, total_bytes: int, page_tokens: int = 64):
        if total_bytes < 0 or page_tokens < 1:
            raise ValueError("KV budget needs total_bytes >= 0 and page_tokens >= 1")
        self.total_bytes = total_bytes
        self.page_tokens = page_tokens
        self.used_bytes = 0
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.total_bytes - self.used_bytes:
                return False
            self.used_bytes += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used_bytes -= nbytes


def unlimited_budget() -> KVBudget:
    return KVBudget(1 << 62)


class KVCache:
    """Keys and values of one session (`rows` sequences) on blocks `span`. Mutated by `begin`, `write`,
    `commit`, `rollback`, `free`; read by the attention through `layer()`."""

    def __init__(self, span: Span, rows: int, max_length: int, bytes_per_block_token: int, budget: KVBudget):
        self.span = span
        self.rows = rows
        self.max_length = max_length
        self.budget = budget
        self.row_token_bytes = bytes_per_block_token * span.length  # one slot of one row, every block
        self.length = 0  # slots already committed
        self.capacity = 0  # slots allocated per row (a whole number of pages)
        self.valid = torch.zeros(rows, 0, dtype=torch.bool)
        self._keys: list[torch.Tensor | None] = [None] * span.length
        self._values: list[torch.Tensor | None] = [None] * span.length
        self.pending = 0  # slots of the step in flight
        self.freed = False
        self.decode_graph = None  # swarm.runtime.graphs.GraphState recorded for this cache, if any

    # ---------------------------------------------------------------- memory

    @property
    def nbytes(self) -> int:
        """Bytes taken from the budget (= the storage allocated, once the first step ran)."""
        return self.capacity * self.rows * self.row_token_bytes

    @property
    def tokens(self) -> int:
        """Token slots in use (rows x committed length)."""
        return self.rows * self.length

    def reserve(self, end: int) -> None:
        """Make room for slots [0, end) per row, taking pages from the budget; CacheFull if it has none.
        Tensors are (re)allocated lazily by `write`, at the capacity reserved here."""
        if end <= self.capacity:
            return
        page = self.budget.page_tokens
        want = max(end, self.capacity + self.capacity // GROWTH_FRACTION)
        capacity = min(math.ceil(want / page) * page, max(math.ceil(self.max_length / page) * page, page))
        capacity = max(capacity, end)
        extra = (capacity - self.capacity) * self.rows * self.row_token_bytes
        if not self.budget.take(extra):
            raise CacheFull(f"{extra} bytes for {capacity - self.capacity} more slots x {self.rows} rows")
        self.capacity = capacity

    def free(self) -> None:
        """Give every page back (once); the cache is unusable after."""
        if not self.freed:
            self.freed = True
            self.budget.give(self.nbytes)
            self._keys = [None] * self.span.length
            self._values = [None] * self.span.length
            self.decode_graph = None  # it holds the tensors too

    # ---------------------------------------------------------------- one step

    def begin(self, new_valid: torch.Tensor) -> None:
        """Start a step that appends `new_valid.shape[1]` slots ([rows, new] bool); `reserve` first."""
        new = new_valid.shape[1]
        if self.length + new > self.capacity:
            raise CacheFull(f"step of {new} slots at {self.length} exceeds the reserved {self.capacity}")
        self.pending = new
        self.valid = torch.cat([self.valid[:, : self.length], new_valid.to(torch.bool).cpu()], dim=1)

    def write(self, block: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store this step's K/V ([rows, kv_heads, new, head_dim]) of global block `block`."""
        i = block - self.span.start
        if self._keys[i] is None or self._keys[i].shape[2] < self.capacity:
            self._keys[i] = self._grown(self._keys[i], key)
            self._values[i] = self._grown(self._values[i], value)
        new = key.shape[2]
        self._keys[i].narrow(2, self.length, new).copy_(key)  # narrow: cheaper than slice assignment
        self._values[i].narrow(2, self.length, new).copy_(value)

    def write_at(self, block: int, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one-slot K/V ([rows, kv_heads, 1, head_dim]) at slot tensor `slot` ([1]): no Python int
        in the indexing, so a CUDA graph can record it; the tensors must already span the capacity."""
        i = block - self.span.start
        self._keys[i].index_copy_(2, slot, key)
        self._values[i].index_copy_(2, slot, value)

    def full(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block`'s K/V tensors over the whole capacity, unwritten slots included."""
        i = block - self.span.start
        return self._keys[i], self._values[i]

    def layer(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of block `block`'s K/V up to the end of the step in flight (no copy)."""
        i = block - self.span.start
        end = self.length + self.pending
        return self._keys[i].narrow(2, 0, end), self._values[i].narrow(2, 0, end)

    def _grown(self, old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        rows, heads, _, dim = like.shape
        # zeros, not garbage: masked attention over the whole capacity (CUDA graphs) multiplies the unused
        # slots' values by a probability of 0, and 0 x NaN would be NaN
        new = like.new_zeros(rows, heads, self.capacity, dim)
        if old is not None and self.length:
            new[:, :, : self.length] = old[:, :, : self.length]
        return new

    def commit(self) -> None:
        self.length += self.pending
        self.pending = 0

    def rollback(self) -> None:
        """Forget an uncommitted step (its K/V slots are simply overwritten later)."""
        self.pending = 0
        self.valid = self.valid[:, : self.length]

    # Attribute some transformers attention code reads; we never compile or offload this cache.
    is_compileable = False
