"""KV memory: a byte budget handed out in pages, a pool of KV storage shared by sessions, and the
per-session cache that draws on both.

`KVBudget` is the peer's KV memory in bytes (the accounting). `KVPool` is the storage of one block
range: for each block, keys and values as [kv_heads, slots, head_dim] views of one tensor, shared by
every session on those blocks. A session's `KVCache` owns one contiguous `Region` of the pool's slots:
`rows` runs of `capacity` slots each (row r at region.start + r * capacity). Its capacity is a whole
number of pages (`page_tokens` slots per row), taken from the budget as the session grows and all given
back on `free()`; nothing is allocated for the session's worst case
(`max_nbytes`, which admission counts: peer.sessions).

Because every session's K/V lie in one tensor per block, a batched step writes the new K/V of all its
sessions with one `index_copy_` per block, and on CUDA one varlen flash-attention call per block reads
every session's region in place (start offset and used length per row; swarm.runtime.span). Nothing is
copied per step; a region is copied only when it grows and cannot extend in place (by at least 1/16 of
its size, so O(1) per token amortized and capacity within 1/16 + one page of use).

The pool's tensor grows on demand (doubling, copying the regions packed to its front, which also undoes
fragmentation) and packs its regions in place when its free runs are too scattered to place a region;
it keeps its size when sessions close (like the allocator's cache: the budget, not the tensor, says
what is in use), so CUDA graphs recorded over it (swarm.runtime.graphs) stay valid until it grows
(`generation`): a region's place is an input of every replay, the tensor's address is not. One extra
slot at its end, the sink, belongs to no region: idle rows of a graph write and read there. Slots
handed to a region are zeroed.

Slots are absolute positions in the session's stream, padding included; `valid[row, slot]` says
whether a slot holds a real token (left padding does not), which the mask builder needs.

Thread use: the peer's compute thread mutates caches and pools (a pool moves regions only while no
forward runs: the scheduler reserves between forwards); `KVBudget` and the pool's bookkeeping are
locked, so the event loop may read the budget, and free a cache that no step is running on, at any time.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from swarm.runtime.quant import decode_kv, encode_kv, kv_bytes_per_block_token, kv_storage
from swarm.spans import Span

GROWTH_FRACTION = 16  # a session's capacity grows by at least capacity / GROWTH_FRACTION
POOL_MIN_SLOTS = 256


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


@dataclass(eq=False)
class Region:
    """A run of pool slots owned by one cache; `start` changes when the pool moves it."""

    start: int = 0
    slots: int = 0


class KVPool:
    """K/V storage of blocks `span` for every session on them: `keys[i]`, `values[i]` are block
    span.start + i's [kv_heads, slots + 1, head_dim] (views of one tensor, replaced when the pool grows;
    slot `sink` = `slots` is the sink)."""

    def __init__(self, span: Span, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 pin: bool = False, kv_format: str = "auto"):
        """`dtype`: the K/V the model computes; `kv_format` "fp8": stored as float8 codes and a scale per vector
        (swarm.runtime.quant; keys/values are then uint8 [kv_heads, slots + 1, head_dim + 4]); `pin`:
        page-locked host memory (a pool in host RAM for a model on the GPU)."""
        self.span = span
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.kv_format = kv_format
        self.store_dtype, self.width = kv_storage(head_dim, dtype, kv_format)
        self.pin = pin
        self.slots = 0
        self.storage: torch.Tensor | None = None  # [blocks, 2, kv_heads, slots, width]
        self._scratch: torch.Tensor | None = None  # [2, kv_heads, slots + 1, head_dim]: one block, compute dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.generation = 0  # times the tensor was reallocated (grown): graphs over the old one are stale
        self._free: list[list[int]] = []  # [start, length] runs, sorted by start, coalesced
        self._live: set[Region] = set()
        self._lock = threading.Lock()

    @property
    def slot_bytes(self) -> int:
        return self.span.length * kv_bytes_per_block_token(self.kv_heads, self.head_dim, self.dtype, self.kv_format)

    @property
    def sink(self) -> int:
        return self.slots

    @property
    def used_slots(self) -> int:
        return sum(r.slots for r in self._live)

    def resize(self, region: Region, rows: int, capacity: int, new_capacity: int, length: int) -> None:
        """Make `region` hold `rows` runs of `new_capacity` slots, keeping each row's first `length` slots
        (the region held `rows` runs of `capacity` before; 0 slots for a new region)."""
        with self._lock:
            want = rows * new_capacity
            if region.slots == 0:
                region.start, region.slots = self._place(want), want
                self._live.add(region)
                self._zero(region.start, want)
                return
            end = region.start + region.slots
            run = next((r for r in self._free if r[0] == end), None)
            if rows == 1 and run is not None and run[1] >= want - region.slots:  # extend in place
                extra = want - region.slots
                run[0] += extra
                run[1] -= extra
                if run[1] == 0:
                    self._free.remove(run)
                self._zero(end, extra)
                region.slots = want
                return
            start = self._place(want)  # may move every live region, this one too
            self._zero(start, want)
            if length:
                for row in range(rows):
                    self.storage[:, :, :, start + row * new_capacity:][:, :, :, :length].copy_(
                        self.storage[:, :, :, region.start + row * capacity:][:, :, :, :length])
            self._give(region.start, region.slots)
            region.start, region.slots = start, want

    def readable(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block span.start + i's keys and values in `dtype`: the pool's own views, or (pages stored in another
        dtype) the whole block converted into a scratch buffer that stays put until the pool grows, so a
        CUDA graph may record the conversion."""
        if self.store_dtype == dtype:
            return self.keys[i], self.values[i]
        if self._scratch is None or self._scratch.dtype != dtype:
            self._scratch = torch.empty(2, self.kv_heads, self.slots + 1, self.head_dim, dtype=dtype, device=self.device)
        decode_kv(self.storage[i], dtype, self.kv_format, out=self._scratch)
        return self._scratch[0], self._scratch[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """New K or V [kv_heads, n, head_dim] as this pool stores them, on its device."""
        return encode_kv(x, self.kv_format).to(self.device, self.store_dtype)

    def decode(self, stored: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A view of stored K or V [..., width] in the compute dtype on `device` ([..., head_dim])."""
        return decode_kv(stored.to(device, non_blocking=True), self.dtype, self.kv_format)

    def release(self, region: Region) -> None:
        """Give a region's slots back (the tensor keeps its size)."""
        with self._lock:
            if region not in self._live:
                return
            self._live.discard(region)
            self._give(region.start, region.slots)
            region.slots = 0

    # ---------------------------------------------------------------- bookkeeping (lock held)

    def _place(self, n: int) -> int:
        """Start of a free run of `n` slots, taken from the free list (growing or packing the pool first
        when no run is long enough)."""
        for run in self._free:
            if run[1] >= n:
                start = run[0]
                run[0] += n
                run[1] -= n
                if run[1] == 0:
                    self._free.remove(run)
                return start
        used = self.used_slots
        if self.slots - used >= n:  # room enough, but scattered: pack the regions
            self._pack()
        else:
            self._grow(max(used + n, 2 * self.slots, POOL_MIN_SLOTS))
        return self._place(n)

    def _give(self, start: int, n: int) -> None:
        runs = self._free
        i = 0
        while i < len(runs) and runs[i][0] < start:
            i += 1
        runs.insert(i, [start, n])
        if i + 1 < len(runs) and start + n == runs[i + 1][0]:  # merge with the next run
            runs[i][1] += runs.pop(i + 1)[1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == start:  # and the previous one
            runs[i - 1][1] += runs.pop(i)[1]

    def _grow(self, slots: int) -> None:
        """A new tensor of `slots` slots (and the sink) holding the live regions, packed at its front."""
        used = self._pack() if self.storage is not None else 0
        new = torch.empty(self.span.length, 2, self.kv_heads, slots + 1, self.width, dtype=self.store_dtype,
                          device=self.device, pin_memory=self.pin).zero_()
        self._scratch = None
        if used:
            new[:, :, :, :used].copy_(self.storage[:, :, :, :used])
        self.storage, self.slots = new, slots
        self.keys = list(new[:, 0].unbind(0))
        self.values = list(new[:, 1].unbind(0))
        self._free = [[used, slots - used]] if slots > used else []
        self.generation += 1

    def _pack(self) -> int:
        """Move the live regions to the front of the same tensor, in order (a region moves toward the front
        by less than its length at times, so each goes through a copy); returns the slots they fill."""
        at = 0
        for region in sorted(self._live, key=lambda r: r.start):
            if region.start != at:
                moved = self.storage[:, :, :, region.start : region.start + region.slots].clone()
                self.storage[:, :, :, at : at + region.slots].copy_(moved)
                region.start = at
            at += region.slots
        self._free = [[at, self.slots - at]] if self.slots > at else []
        return at

    def _zero(self, start: int, n: int) -> None:
        self.storage[:, :, :, start : start + n].zero_()


class KVCache:
    """Keys and values of one session (`rows` sequences) on blocks `span`, in a region of `pool`.
    Mutated by `reserve`, `begin`, `commit`, `rollback`, `truncate`, `free` (K/V themselves are written by the
    forward, into `pool` at `slots()`); read by the attention through `layer()`."""

    def __init__(self, span: Span, rows: int, max_length: int, bytes_per_block_token: int, budget: KVBudget,
                 pool: KVPool):
        if pool.span != span:
            raise ValueError(f"a cache on blocks {span} needs a pool of those blocks, not {pool.span}")
        self.span = span
        self.rows = rows
        self.max_length = max_length
        self.budget = budget
        self.pool = pool
        self.region = Region()
        self.row_token_bytes = bytes_per_block_token * span.length  # one slot of one row, every block
        self.length = 0  # slots already committed
        self.capacity = 0  # slots allocated per row (a whole number of pages)
        self._valid: torch.Tensor | None = None  # [rows, slots] once some slot is padding; None: all valid
        self.pending = 0  # slots of the step in flight
        self.freed = False

    # ---------------------------------------------------------------- memory

    @property
    def nbytes(self) -> int:
        """Bytes taken from the budget (= the pool slots this cache holds)."""
        return self.capacity * self.rows * self.row_token_bytes

    @property
    def max_capacity(self) -> int:
        """Slots per row this cache can ever hold while its steps stay within max_length: `reserve` never
        goes past it for an `end` <= max_length (whole pages; at least one)."""
        page = self.budget.page_tokens
        return max(math.ceil(self.max_length / page), 1) * page

    @property
    def max_nbytes(self) -> int:
        """The most `nbytes` can reach (admission counts it: peer.sessions)."""
        return self.max_capacity * self.rows * self.row_token_bytes

    @property
    def tokens(self) -> int:
        """Token slots in use (rows x committed length)."""
        return self.rows * self.length

    def reserve(self, end: int) -> None:
        """Make room for slots [0, end) per row, taking pages from the budget (CacheFull if it has none)
        and slots from the pool."""
        if end <= self.capacity:
            return
        if self.freed:
            raise CacheFull("the session's cache was freed")
        page = self.budget.page_tokens
        want = max(end, self.capacity + self.capacity // GROWTH_FRACTION)
        capacity = max(min(math.ceil(want / page) * page, self.max_capacity), end)
        extra = (capacity - self.capacity) * self.rows * self.row_token_bytes
        if not self.budget.take(extra):
            raise CacheFull(f"{extra} bytes for {capacity - self.capacity} more slots x {self.rows} rows")
        try:
            self.pool.resize(self.region, self.rows, self.capacity, capacity, self.length)
        except torch.OutOfMemoryError as e:  # the device has less than the budget says: wait like a full budget
            self.budget.give(extra)
            raise CacheFull(f"device out of memory for {capacity} slots x {self.rows} rows") from e
        self.capacity = capacity

    def free(self) -> None:
        """Give every page back (once); the cache is unusable after."""
        if not self.freed:
            self.freed = True
            self.budget.give(self.nbytes)
            self.pool.release(self.region)

    # ---------------------------------------------------------------- one step

    def begin(self, new_valid: torch.Tensor) -> None:
        """Start a step that appends `new_valid.shape[1]` slots ([rows, new] bool); `reserve` first."""
        new = new_valid.shape[1]
        if self.length + new > self.capacity:
            raise CacheFull(f"step of {new} slots at {self.length} exceeds the reserved {self.capacity}")
        self.pending = new
        if self._valid is not None or not bool(new_valid.all()):  # the common case keeps no mask at all
            before = self.valid[:, : self.length]
            self._valid = torch.cat([before, new_valid.to(torch.bool).cpu()], dim=1)

    @property
    def padded(self) -> bool:
        """Whether some slot of the session (the step in flight included) is padding."""
        return self._valid is not None

    @property
    def valid(self) -> torch.Tensor:
        """[rows, length + pending] bool: which slots hold real tokens."""
        if self._valid is None:
            return torch.ones(self.rows, self.length + self.pending, dtype=torch.bool)
        return self._valid

    def row_starts(self) -> list[int]:
        """Pool slot of each row's slot 0."""
        return [self.region.start + row * self.capacity for row in range(self.rows)]

    def slots(self) -> list[int]:
        """Pool slots the step in flight writes, row by row."""
        return [start + j for start in self.row_starts() for j in range(self.length, self.length + self.pending)]

    def layer(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block`'s K/V up to the end of the step in flight: [rows, kv_heads, length, head_dim]
        views of the pool (no copy)."""
        end = self.length + self.pending
        i = block - self.span.start
        start, capacity = self.region.start, self.capacity
        k, v = self.pool.keys[i], self.pool.values[i]
        if self.rows == 1:
            return k.narrow(1, start, end).unsqueeze(0), v.narrow(1, start, end).unsqueeze(0)
        k = k.narrow(1, start, self.rows * capacity).unflatten(1, (self.rows, capacity)).transpose(0, 1)
        v = v.narrow(1, start, self.rows * capacity).unflatten(1, (self.rows, capacity)).transpose(0, 1)
        return k.narrow(2, 0, end), v.narrow(2, 0, end)

    def commit(self) -> None:
        self.length += self.pending
        self.pending = 0

    def rollback(self) -> None:
        """Forget an uncommitted step (its K/V slots are simply overwritten later)."""
        self.truncate(self.length)

    def truncate(self, length: int) -> None:
        """Go back to holding the first `length` slots (<= length): later slots are forgotten, and simply
        overwritten by the next steps; pages stay reserved."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length, self.pending = length, 0
        if self._valid is not None:
            kept = self._valid[:, :length]
            self._valid = None if bool(kept.all()) else kept

    # Attribute some transformers attention code reads; we never compile or offload this cache.
    is_compileable = False
