"""What one batched forward of a span carries: the sessions' steps (`Segment`), the cache the layers see
(`Step`: where every new K/V goes in the pool) and the varlen flash-attention arguments (`FlashBatch`).

The layer below both the eager path (swarm.runtime.span) and the CUDA graphs (swarm.runtime.graphs): it
knows caches and pools, and of the model only what a step needs (`device`, `flash`, `flash_forwards`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from swarm.runtime.cache import KVCache, KVPool


class StepModel(Protocol):
    """What a step needs of the model running it (swarm.runtime.span.SpanModel is one)."""

    device: torch.device
    flash: bool  # whether varlen flash attention is on for it
    flash_forwards: int  # forwards that took the flash path (counted here)


@dataclass
class Segment:
    """One session's step inside a batched forward."""

    cache: KVCache
    hidden: torch.Tensor  # [rows, new, hidden_size]
    position_ids: torch.Tensor  # [rows, new] int64
    valid: torch.Tensor  # [rows, new] bool
    offset: int = 0  # where its tokens start in the packed sequence
    masks: dict = field(default_factory=dict)  # window -> mask or None, built once per step

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def new(self) -> int:
        return self.hidden.shape[1]

    @property
    def end(self) -> int:
        return self.offset + self.rows * self.new


class Step:
    """What the layers see as their cache for one batched forward; our attention reads it from kwargs.
    Every segment's new K/V go into the pool with one `index_copy_` per block (at `write_index`); when
    `flash` is set (CUDA, no padding) one varlen flash-attention call per block reads every session's
    region of the pool in place, else attention runs per segment over views of its cache."""

    def __init__(self, model: StepModel, pool: KVPool, write_index: torch.Tensor, flash: FlashBatch | None,
                 segments: list[Segment] = ()):
        self.model = model
        self.pool = pool
        self.write_index = write_index
        self.flash = flash
        self.segments = segments  # none for a graph's step over static buffers (flash attention only)
        self.shapes = [(s.rows, s.new) for s in segments]
        self.sizes = [rows * new for rows, new in self.shapes]

    @classmethod
    def of(cls, model: StepModel, segments: list[Segment]) -> Step:
        """The eager step of `segments` (their caches' steps begun): write slots, and the flash arguments
        when the flash path is on and no session has padding."""
        pool = segments[0].cache.pool
        write_index = torch.tensor([i for s in segments for i in s.cache.slots()]).to(pool.device)
        flash = None
        if model.flash and not any(s.cache.padded for s in segments):
            flash = FlashBatch.of(segments, model.device)
            model.flash_forwards += 1
        return cls(model, segments[0].cache.pool, write_index, flash, segments)

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """[1, heads, total, dim] -> each segment's [rows, heads, new, dim] (views from one split call)."""
        parts = packed[0].split(self.sizes, dim=1) if len(self.sizes) > 1 else (packed[0],)
        return [part.unsqueeze(0) if rows == 1 else part.unflatten(1, (rows, new)).transpose(0, 1)
                for part, (rows, new) in zip(parts, self.shapes, strict=True)]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store every segment's new K/V ([1, kv_heads, total, head_dim]) in the pool's block
        ([kv_heads, slots, head_dim]); the attention reads the pool, not the return value."""
        pool = self.pool
        i = layer_idx - pool.span.start
        # as the pool stores them (fp8 codes and scales) where it lives (host RAM: copied there)
        pool.keys[i].index_copy_(1, self.write_index, pool.encode(key[0]))
        pool.values[i].index_copy_(1, self.write_index, pool.encode(value[0]))
        return key, value

    is_compileable = False


class FlashBatch:
    """Varlen flash-attention arguments of one forward whose segments need no mask but causality (no
    padding): each row of each segment is one sequence, its queries the segment's new tokens, its keys
    its row's region of the pool (start offset, used length: the new tokens' K/V included).
    `meta`: int32 [cu_q (rows + 1) | region starts (rows, then one unused) | used lengths (rows)]."""

    def __init__(self, meta: torch.Tensor, rows: int, max_q: int, max_k: int):
        self.cu_q, self.cu_k, self.used = meta[: rows + 1], meta[rows + 1 : 2 * rows + 2], meta[2 * rows + 2 :]
        self.max_q, self.max_k = max_q, max_k

    @staticmethod
    def meta(segments: list[Segment], rows: int = 0, sink: int = 0) -> tuple[torch.Tensor, int, int]:
        """`meta` of the segments (their steps begun) on the CPU, padded to `rows` rows with spare ones (one
        query over the `sink` slot alone), and the longest query and key runs."""
        starts, used, news = [], [], []
        for s in segments:
            cache = s.cache
            starts += cache.row_starts()
            used += [cache.length + cache.pending] * s.rows
            news += [s.new] * s.rows
        spare = max(0, rows - len(starts))
        starts, used, news = starts + [sink] * spare, used + [1] * spare, news + [1] * spare
        meta = torch.tensor([0] + news + starts + [0] + used, dtype=torch.int32)
        meta[: len(starts) + 1] = meta[: len(starts) + 1].cumsum(0)
        return meta, max(news), max(used)

    @classmethod
    def of(cls, segments: list[Segment], device: torch.device) -> FlashBatch:
        meta, max_q, max_k = cls.meta(segments)
        return cls(meta.to(device, non_blocking=True), sum(s.rows for s in segments), max_q, max_k)
