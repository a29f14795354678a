"""CUDA graphs for a session's decode step: one replay instead of hundreds of kernel launches.

At batch 1 a decode step of a big model is bound by kernel launches from Python, not by the GPU: an
8B model's 32 blocks cost ~35 ms eager on an H100 against ~5 ms of memory traffic. When an iteration of
the scheduler holds a single session's single-token step, SpanModel replays a CUDA graph of the whole
span instead (`DecodeGraphs.run`); every other iteration (several sessions, prompts) runs eagerly.

What makes the step capturable: fixed addresses and shapes. The graph is recorded per session cache
and capacity; its inputs are static buffers filled before each replay (hidden states, rotary positions,
the slot the new K/V go to, and an attention mask over the cache's whole capacity per sliding window).
Inside the graph the layers are the model's own transformers modules; our attention function sees
`step.graph` and writes K/V with `index_copy_` at the slot tensor, then attends over the full-capacity
cache with that mask, the query heads of each K/V head grouped (no K/V repeat, no copy of the cache).

Recording costs about one eager step; a graph is re-recorded when the cache grows (its tensors move: with
pages of 16 slots and growth by 1/16, about once per 16-40 steps) and dropped when the session's cache is
freed. The scheduler lets a lone step record only when the peer has been running one session at a time;
on a busy peer a lone step replays a graph it has, or runs eagerly. A model
whose blocks cannot be captured (mixture-of-experts routing syncs with the CPU) disables graphs for the
process after the first failure, with a log line, and runs eagerly. `capture=False` runs the same
static-buffer step without recording it: the graph path's arithmetic, testable on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class GraphState:
    """A session's recorded decode step: static inputs, the graph, its output buffer."""

    key: tuple  # (capacity, rows, address of the first block's keys): a mismatch means record again
    hidden: torch.Tensor  # [1, rows, hidden_size]
    position_ids: torch.Tensor  # [1, rows]
    slot: torch.Tensor  # [1] int64: the cache slot this step writes
    masks: dict = field(default_factory=dict)  # window -> [rows, 1, 1, capacity] bool, True = attend
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, capture: bool = True):
        self.model = model
        self.capture = capture
        self.disabled: str | None = None  # why graphs are off for this model, once a capture failed
        self.recorded = 0  # graphs recorded (with capture=False: static states made); tests and `info` read it
        self.record_s = 0.0  # time spent recording them
        self.replays = 0
        self._warmed_up = False
        self._stream: torch.cuda.Stream | None = None  # where graphs are recorded

    @staticmethod
    def _key(cache) -> tuple | None:
        """The cache's identity for a graph, or None while its tensors do not all span its capacity."""
        keys = cache._keys
        if any(k is None or k.shape[2] != cache.capacity for k in keys):
            return None  # the eager path (re)allocates them at the reserved capacity
        return cache.capacity, cache.rows, keys[0].data_ptr()

    def run(self, segment, may_record: bool = True) -> torch.Tensor | None:
        """The segment's output through the graph (committed into its cache), or None: run it eagerly.
        `may_record` False: replay a graph the cache already has, but record none (a busy peer's lone step)."""
        cache = segment.cache
        if self.disabled or cache.length + 1 > cache.capacity:
            return None
        key = self._key(cache)
        if key is None:
            return None
        state = cache.decode_graph
        if state is None or state.key != key:
            cache.decode_graph = None
            if not may_record:
                return None
            try:
                state = self._record(cache, key)
            except torch.cuda.OutOfMemoryError:  # no room for this graph now; eager this time
                return None
            except Exception as e:  # not capturable (data-dependent control flow, CPU syncs): eager from now on
                self.disabled = f"{type(e).__name__}: {e}"
                logger.warning("CUDA graphs off for this span (capture failed: %s); running eagerly", self.disabled)
                return None
            cache.decode_graph = state
        start = cache.length
        cache.begin(segment.valid)
        try:
            self._fill(state, cache, segment, start)
            if state.graph is not None:
                state.graph.replay()
                out = state.out
            else:
                out = self._step(state, cache)
            self.replays += 1
        except BaseException:
            cache.rollback()
            raise
        cache.commit()
        return out[0].view(cache.rows, 1, -1).clone()

    def _fill(self, state: GraphState, cache, segment, start: int) -> None:
        rows = cache.rows
        state.hidden.copy_(segment.hidden.reshape(1, rows, -1))
        state.position_ids.copy_(segment.position_ids.reshape(1, rows))
        state.slot.fill_(start)
        for window, mask in state.masks.items():
            mask.copy_(self._mask(cache, start, window))

    @staticmethod
    def _mask(cache, start: int, window: int | None) -> torch.Tensor:
        """[rows, 1, 1, capacity] on the CPU: the step's query (at slot `start`) sees valid slots up to itself
        (and within its window); padding queries see themselves, as in SpanModel's masks."""
        slots = torch.arange(cache.capacity)
        valid = torch.zeros(cache.rows, cache.capacity, dtype=torch.bool)
        valid[:, : start + 1] = cache.valid[:, : start + 1]
        allowed = valid & (slots <= start)
        if window is not None:
            allowed &= start - slots < window
        allowed |= slots == start
        return allowed.view(cache.rows, 1, 1, cache.capacity)

    def _step(self, state: GraphState, cache) -> torch.Tensor:
        from swarm.runtime.span import Segment, _Step

        segment = Segment(cache, state.hidden.view(cache.rows, 1, -1), state.position_ids.view(cache.rows, 1), None)
        return self.model._layers(state.hidden, state.position_ids, _Step(self.model, [segment], graph=state),
                                  cache.span)

    def _record(self, cache, key: tuple) -> GraphState:
        model, rows = self.model, cache.rows
        device = model.device
        windows = {model.windows[b - model.span.start] for b in range(cache.span.start, cache.span.end)}
        state = GraphState(
            key=key,
            hidden=torch.zeros(1, rows, model.config.hidden_size, dtype=model.dtype, device=device),
            position_ids=torch.zeros(1, rows, dtype=torch.long, device=device),
            slot=torch.full((1,), cache.length, dtype=torch.long, device=device),
            masks={w: torch.ones(rows, 1, 1, cache.capacity, dtype=torch.bool, device=device) for w in windows},
        )
        self.recorded += 1
        if not self.capture:
            return state
        start = time.perf_counter()
        current = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):  # recording needs a stream other than the default one
                if not self._warmed_up:
                    # once per process: a plain run does the lazy inits (cuBLAS handles, workspaces) that
                    # must not happen while recording; it writes only the uncommitted slot `cache.length`
                    self._step(state, cache)
                    self._warmed_up = True
                # capture_begin/end rather than `with torch.cuda.graph()`, whose entry runs gc.collect() and
                # empties the allocator's cache. A private memory pool per graph: a pool shared with graphs
                # since freed trips an allocator assert (torch 2.11); a batch-1 step's activations are small.
                # "thread_local": the event loop thread may free another session's graph meanwhile
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize(device)
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    state.out = self._step(state, cache)
                finally:
                    graph.capture_end()
        finally:
            current.wait_stream(self._stream)
        state.graph = graph
        self.record_s += time.perf_counter() - start
        return state
