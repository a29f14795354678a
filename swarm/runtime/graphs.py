"""CUDA graphs for batched decode steps: one replay instead of hundreds of kernel launches.

A decode step of a big model is bound by kernel launches from Python, not by the GPU: an 8B model's
16-block span costs ~10 ms of Python per eager forward on an H200 whether it carries 1 session or 64,
against well under a millisecond of GPU time. So when an iteration of the scheduler holds only
single-token steps of sessions without padding (the steady state of serving), SpanModel replays a CUDA
graph of the whole span instead (`DecodeGraphs.run`); prompts and padded sessions run eagerly.

One graph per block range and bucket of token rows (1, 2, 4, ... 128): a batch of R rows replays the
smallest bucket >= R, its spare rows idle (zero input, their K/V written to the pool's sink slot, their
attention over that one slot). Static inputs, filled before each replay: hidden states, rotary
positions, the pool slot each row's new K/V go to, and each row's region start and used length for the
varlen flash attention over the pool (swarm.runtime.span): the same kernels as the eager flash path, so
the outputs are the eager path's. A graph depends only on where the pool's tensor lies, not on any
session: it serves every batch of its bucket and is recorded again only when the pool's tensor is
reallocated (the pool grows by doubling, so a handful of times in a peer's life).

A model whose blocks cannot be captured (mixture-of-experts routing syncs with the CPU) disables graphs
for the process after the first failure, with a log line, and runs eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from swarm.runtime.batch import FlashBatch, Step

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(eq=False)
class GraphState:
    """A recorded decode step of `rows` token rows over one pool's tensor (`generation`)."""

    generation: int
    rows: int
    hidden: torch.Tensor  # [1, rows, hidden_size]
    position_ids: torch.Tensor  # [1, rows]
    meta: torch.Tensor  # int32 [rows + 1 (cu_q) | rows + 1 (region starts) | rows (used)]
    write_index: torch.Tensor  # [rows] int64: the pool slot each row writes
    flash: FlashBatch  # over `meta`
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model):
        self.model = model
        self.disabled: str | None = None  # why graphs are off for this model, once a capture failed
        self.recorded = 0  # graphs recorded; tests and `info` read it
        self.record_s = 0.0  # time spent recording them
        self.replays = 0
        self._states: dict[tuple[int, int, int], GraphState] = {}  # (blocks start, end, bucket) -> state
        self._stream: torch.cuda.Stream | None = None  # where graphs are recorded

    def run(self, segments) -> torch.Tensor | None:
        """The segments' outputs packed [rows, hidden] in their order, through a graph (committed into the
        caches), or None: run them eagerly."""
        if self.disabled or not self.model.flash or any(s.new != 1 for s in segments):
            return None
        rows = sum(s.rows for s in segments)
        bucket = next((b for b in BUCKETS if b >= rows), None)
        if bucket is None or any(s.cache.padded or not bool(s.valid.all()) for s in segments):
            return None
        pool = segments[0].cache.pool
        key = (pool.span.start, pool.span.end, bucket)
        state = self._states.get(key)
        if state is None or state.generation != pool.generation:
            self._states.pop(key, None)
            try:
                state = self._record(pool, bucket)
            except torch.OutOfMemoryError:  # no room for this graph now; eager this time
                return None
            except Exception as e:  # not capturable (data-dependent control flow, CPU syncs): eager from now on
                self.disabled = f"{type(e).__name__}: {e}"
                logger.warning("CUDA graphs off for this span (capture failed: %s); running eagerly", self.disabled)
                return None
            self._states[key] = state
        for s in segments:
            s.cache.begin(s.valid)
        try:
            self._fill(state, segments, rows, pool)
            state.graph.replay()
            self.replays += 1
        except BaseException:
            for s in segments:
                s.cache.rollback()
            raise
        for s in segments:
            s.cache.commit()
        return state.out[0, :rows].clone()

    def _fill(self, state: GraphState, segments, rows: int, pool) -> None:
        spare = state.rows - rows
        hidden = torch.cat([s.hidden for s in segments]).view(rows, -1)  # decode steps: [rows, 1, hidden] each
        positions = torch.cat([s.position_ids for s in segments]).view(rows)
        meta, _, _ = FlashBatch.meta(segments, state.rows, pool.sink)
        slots = torch.tensor([i for s in segments for i in s.cache.slots()] + [pool.sink] * spare)
        state.meta.copy_(meta, non_blocking=True)  # spare rows: attend to the sink slot alone, write there
        state.write_index.copy_(slots, non_blocking=True)
        state.hidden[0, :rows].copy_(hidden, non_blocking=True)
        state.hidden[0, rows:].zero_()
        state.position_ids[0, :rows].copy_(positions, non_blocking=True)
        state.position_ids[0, rows:].zero_()

    def _record(self, pool, rows: int) -> GraphState:
        model, device = self.model, self.model.device
        meta, _, _ = FlashBatch.meta([], rows, pool.sink)
        meta = meta.to(device)
        state = GraphState(
            generation=pool.generation, rows=rows,
            hidden=torch.zeros(1, rows, model.config.hidden_size, dtype=model.dtype, device=device),
            position_ids=torch.zeros(1, rows, dtype=torch.long, device=device),
            meta=meta, write_index=torch.full((rows,), pool.sink, dtype=torch.long, device=device),
            flash=FlashBatch(meta, rows, max_q=1, max_k=pool.slots + 1),
        )

        def step() -> torch.Tensor:
            return model._layers(state.hidden, state.position_ids, Step(model, pool, state.write_index, state.flash),
                                 pool.span)

        start = time.perf_counter()
        current = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):  # recording needs a stream other than the default one
                # a plain run first does the lazy inits (cuBLAS handles, workspaces) that must not happen
                # while recording; its rows write only the sink slot
                step()
                # capture_begin/end rather than `with torch.cuda.graph()`, whose entry runs gc.collect() and
                # empties the allocator's cache. A private memory pool per graph: a pool shared with graphs
                # since freed trips an allocator assert (torch 2.11). "thread_local": the event loop thread
                # may allocate meanwhile
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize(device)
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    state.out = step()
                finally:
                    graph.capture_end()
        finally:
            current.wait_stream(self._stream)
        state.graph = graph
        self.recorded += 1
        self.record_s += time.perf_counter() - start
        return state
