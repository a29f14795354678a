"""Scheduler: continuous batching of every session's steps on this peer.

The event loop submits steps (`submit` returns an asyncio future). One compute thread loops: each
iteration takes the waiting steps in arrival order, up to `max_batch_tokens` tokens: decode steps
whole, prompts in chunks of at most `prefill_chunk_tokens`, so a long prompt runs over several
iterations alongside everyone else's decode steps. All of it runs as one SpanModel.run (one batched
forward). Steps must share a block range to share a forward; the oldest waiting step picks the range.

Bounded wait: a step is taken in the first iteration in which the steps ahead of it leave room, and
each iteration takes at least a chunk of the oldest step, so a step waits at most for the chunks of
the steps that arrived before it (a few iterations), never for steps that arrive after it.

Gathering: a forward of a big model costs about the same for one decode step as for dozens (its time
goes to reading the weights and, from Python, to launching kernels), so on a GPU a peer that ran every
step as soon as it came would spend its time on small forwards while the other sessions' steps arrive
one by one. So when only decode steps are queued, and fewer sessions have a step queued than stepped
here in the last second, the forward waits for them: until no new step has come for a "quiet gap"
(`batch_wait_s` / QUIET_FRACTION), and at most `batch_wait_s` after the oldest step came. A steady crowd
then moves in cohorts that share each forward; the quiet gap ends the wait when a cohort's burst of
steps is over instead of holding it for sessions that are elsewhere in their round (another cohort, a
slow client). A cohort pushed here as one batch by the previous peer (peer.forward) needs no guess: its
last step ends the wait. 0 turns gathering off (the CPU's default).

Memory: before a chunk runs, its session's cache reserves the pages it needs. Admission (peer.sessions)
keeps every open session's worst case within the budget, so the budget always has room; what can still
fail is the device itself (an allocation beyond what it holds). Such a step stays queued (and
`memory_waiters` tells admission to let no new session in) until pages are freed, at most
`max_memory_wait_s`: then it fails with CacheFull, which its session's handler reports to the client
(who moves the session elsewhere). Nothing running is evicted, and no step waits without bound.

Threads: `submit`, `release` and the properties run on the event loop thread; forwards and cache
mutations on the compute thread, except one case: the step of a session the caller says is alone on
the peer (`submit(..., alone=True)`), small (a decode step) and submitted while nothing else is queued
or running, runs at once on the event loop thread ("inline"). That saves the two thread hand-offs a lone
session would pay per step (~0.3 ms on a 2-core machine). With two sessions or more every step goes to
the compute thread, so steps that arrive together are batched. One lock guards the queue and the set of
caches in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from swarm.runtime.batch import Segment
from swarm.runtime.cache import CacheFull, KVCache
from swarm.runtime.span import SpanModel

logger = logging.getLogger(__name__)

MEMORY_RETRY_S = 0.05  # how often steps waiting for KV pages look again (a close also wakes them)
RECENT_S = 1.0  # a session that stepped within this long counts as active when steps gather
QUIET_FRACTION = 8  # gathering ends once no step came for batch_wait_s / QUIET_FRACTION
INLINE_MAX_TOKENS = 16  # token rows of a step that may run inline (a lone decode step, not a prompt): it
# blocks the event loop while it runs, and past a few rows the thread hand-off is a small part of a step


@dataclass(eq=False)
class _Work:
    cache: KVCache
    hidden: torch.Tensor  # [rows, new, hidden]
    position_ids: torch.Tensor
    valid: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_s: float = field(default_factory=time.monotonic)
    thread: int = field(default_factory=threading.get_ident)  # the event loop's thread (submit runs there)
    done: int = 0  # tokens (per row) already run
    outputs: list[torch.Tensor] = field(default_factory=list)
    started: bool = False

    @property
    def left(self) -> int:
        return self.hidden.shape[1] - self.done


@dataclass
class SchedulerStats:
    iterations: int = 0
    steps: int = 0  # steps completed
    segments: int = 0  # segments run (a chunked prompt counts once per chunk)
    tokens: int = 0  # token rows run
    max_batch_segments: int = 0
    max_wait_s: float = 0.0  # longest time a step waited for its first chunk to run
    wait_s: float = 0.0  # summed over steps: queued until its first chunk ran (gathering included)
    busy_s: float = 0.0  # summed over forwards: their wall time (device work included)

    def as_dict(self) -> dict:
        return {
            "iterations": self.iterations, "steps": self.steps, "segments": self.segments, "tokens": self.tokens,
            "max_batch_segments": self.max_batch_segments, "max_wait_ms": round(self.max_wait_s * 1000, 3),
            "wait_s": round(self.wait_s, 4), "busy_s": round(self.busy_s, 4),
        }


class Scheduler:
    def __init__(self, model: SpanModel, *, max_batch_tokens: int = 2048, prefill_chunk_tokens: int = 512,
                 batch_wait_s: float = 0.0, max_memory_wait_s: float = 30.0):
        self.model = model
        self.max_memory_wait_s = max_memory_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.batch_wait_s = batch_wait_s
        self._last_step_s: dict[KVCache, float] = {}  # when each open session last submitted a step
        self.stats = SchedulerStats()
        self._queue: list[_Work] = []
        self._running: set[KVCache] = set()
        self._to_free: list[KVCache] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._memory_wait = False
        self._inline_busy = False  # the event loop thread runs a step itself: the compute thread keeps off
        self._active = 0  # sessions the last gathering wait counted as active (submit wakes it at that many)
        self._cohort_here = False  # a cohort's last step came (submit's cohort_end): run without gathering
        self._thread = threading.Thread(target=self._serve, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the queued steps and wait (up to `timeout`) for the forward in flight to end: no thread may
        still be inside torch when the interpreter finalizes (that aborts the process)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- event loop side

    def submit(self, cache: KVCache, hidden, position_ids, valid, *, alone: bool = False,
               cohort_end: bool = False) -> asyncio.Future:
        """Queue one step of a session; the future gets its output [rows, new, hidden] on the CPU.
        `alone`: no other session is open here, so a small step may run inline (see the module doc).
        `cohort_end`: the last step of a cohort that arrived together (a pushed batch): gathering stops."""
        loop = asyncio.get_running_loop()
        work = _Work(cache, hidden, position_ids, valid, loop.create_future(), loop)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the scheduler is stopped")
            lone = alone and not self._queue and not self._running and hidden.shape[0] * hidden.shape[1] <= min(
                INLINE_MAX_TOKENS, self.max_batch_tokens) and hidden.shape[1] <= self.prefill_chunk_tokens
            idle = not self._queue
            self._queue.append(work)
            self._cohort_here |= cohort_end
            self._last_step_s[cache] = work.enqueued_s
            batch = self._take() if lone else []
            if not batch:
                # wake the compute thread only where this step changes what it waits for: a gathering wait
                # ends by itself at the quiet gap, and every wake-up costs it a GIL hand-off
                if idle or work.left > 1 or cohort_end or self._memory_wait or len(self._queue) >= self._active:
                    self._cond.notify_all()
                return work.future
            self._inline_busy = True
            self._running = {cache}
        try:
            self._run(batch)
        finally:
            self._after_run()
            with self._cond:
                self._inline_busy = False
                self._cond.notify_all()
        return work.future

    def release(self, cache: KVCache) -> None:
        """The session is gone: drop its queued steps and give its pages back (after the forward it is in)."""
        with self._cond:
            self._last_step_s.pop(cache, None)
            for work in [w for w in self._queue if w.cache is cache]:
                self._queue.remove(work)
                _resolve(work, cancel=True)
            if cache in self._running:
                self._to_free.append(cache)
            else:
                cache.free()
            self._cond.notify_all()

    @property
    def memory_waiters(self) -> bool:
        """True while some step waits for KV pages (admission then lets no new session in)."""
        return self._memory_wait

    @property
    def queued_tokens(self) -> int:
        with self._cond:
            return sum(w.left * w.hidden.shape[0] for w in self._queue)

    # ---------------------------------------------------------------- compute thread

    def _serve(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._inline_busy) and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for work in self._queue:
                        _resolve(work, error=RuntimeError("the peer is shutting down"))
                    return
                delay = self._gather_delay()
                if delay > 0:  # other active sessions' decode steps are due: let them join this forward
                    self._cond.wait(delay)
                    continue
                batch = self._take()
                if not batch:  # every waiting step needs KV pages nobody has freed yet
                    self._cond.wait(MEMORY_RETRY_S)
                    continue
                self._running = {work.cache for work, _ in batch}
            try:
                self._run(batch)
            finally:
                self._after_run()

    def _after_run(self) -> None:
        with self._cond:
            self._done_running()

    def _done_running(self) -> None:
        """The forward is over (lock held): free the caches released meanwhile. Done before any step's
        future is settled, so a waiter that submits at once finds the peer idle (and may run inline)."""
        self._running = set()
        for cache in self._to_free:
            cache.free()
        self._to_free.clear()

    def _gather_delay(self) -> float:
        """How much longer the queued steps wait for others (lock held); 0: run them now."""
        if self.batch_wait_s <= 0 or self._cohort_here or any(w.left > 1 for w in self._queue):
            return 0.0
        now = time.monotonic()
        left = min(self._queue[0].enqueued_s + self.batch_wait_s,  # the bound, from the oldest step
                   self._queue[-1].enqueued_s + self.batch_wait_s / QUIET_FRACTION) - now  # the quiet gap
        if left <= 0:
            return 0.0
        queued = {w.cache for w in self._queue}
        self._active = sum(now - t < RECENT_S for t in self._last_step_s.values())
        return left if len(queued) < self._active else 0.0

    def _take(self) -> list[tuple[_Work, int]]:
        """Pick this iteration's chunks (called with the lock held): FIFO, one block range, token budget."""
        batch: list[tuple[_Work, int]] = []
        room = self.max_batch_tokens
        blocks = None
        waiting_for_memory = False
        expired: list[tuple[_Work, CacheFull]] = []  # steps that waited for pages longer than the bound
        for work in self._queue:
            if blocks is not None and work.cache.span != blocks:
                continue
            rows = work.hidden.shape[0]
            chunk = min(work.left, self.prefill_chunk_tokens)
            if batch:
                chunk = min(chunk, room // rows)
                if chunk < 1:
                    continue
            try:
                work.cache.reserve(work.cache.length + chunk)
            except CacheFull as e:
                if time.monotonic() - work.enqueued_s > self.max_memory_wait_s:
                    expired.append((work, e))
                else:
                    waiting_for_memory = True
                continue
            batch.append((work, chunk))
            blocks = work.cache.span
            room -= rows * chunk
            if room <= 0:
                break
        self._memory_wait = waiting_for_memory
        for work, error in expired:
            self._queue.remove(work)
            _resolve(work, error=CacheFull(f"no KV pages for {self.max_memory_wait_s:g} s: {error}"))
        if batch:
            self._cohort_here = False
        now = time.monotonic()
        for work, _ in batch:
            if not work.started:
                work.started = True
                self.stats.max_wait_s = max(self.stats.max_wait_s, now - work.enqueued_s)
                self.stats.wait_s += now - work.enqueued_s
        return batch

    def _run(self, batch: list[tuple[_Work, int]]) -> None:
        segments = [
            Segment(w.cache, w.hidden, w.position_ids, w.valid) if n == w.left == w.hidden.shape[1]  # whole steps
            else Segment(w.cache, w.hidden[:, w.done : w.done + n], w.position_ids[:, w.done : w.done + n],
                         w.valid[:, w.done : w.done + n])
            for w, n in batch
        ]
        started = time.monotonic()
        try:
            flat = self.model.run_packed(segments).cpu()  # [token rows of every segment, hidden]
        except Exception as e:  # e.g. out of device memory: these steps fail, the peer goes on
            logger.exception("batched forward of %d segments failed", len(segments))
            with self._cond:
                self._done_running()
                for work, _ in batch:
                    if work in self._queue:
                        self._queue.remove(work)
                    _resolve(work, error=e)
            return
        s = self.stats
        s.busy_s += time.monotonic() - started
        s.iterations += 1
        s.segments += len(segments)
        s.tokens += sum(seg.rows * seg.new for seg in segments)
        s.max_batch_segments = max(s.max_batch_segments, len(segments))
        offset = 0
        finished = []
        with self._cond:
            self._done_running()
            for (work, n), seg in zip(batch, segments, strict=True):
                size = seg.rows * seg.new
                work.outputs.append(flat[offset : offset + size].view(seg.rows, n, -1))
                offset += size
                work.done += n
                if work.left == 0:
                    finished.append(work)
            done = set(finished)
            self._queue = [w for w in self._queue if w not in done]
        s.steps += len(finished)
        _resolve_all([(w, w.outputs[0] if len(w.outputs) == 1 else torch.cat(w.outputs, dim=1), None, False)
                      for w in finished])


def _resolve(work: _Work, *, result=None, error: BaseException | None = None, cancel: bool = False) -> None:
    """Complete a step's future from any thread (a no-op if its waiter already went away)."""
    _resolve_all([(work, result, error, cancel)])


def _resolve_all(outcomes: list[tuple[_Work, torch.Tensor | None, BaseException | None, bool]]) -> None:
    """Complete steps' futures, each with (result, error, cancel): at once for an inline step (its waiter
    has not even started waiting), otherwise with one wake-up of each event loop for all of its steps."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for outcome in outcomes:
        work = outcome[0]
        if threading.get_ident() == work.thread:
            _settle([outcome])
        else:
            by_loop.setdefault(work.loop, []).append(outcome)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle(outcomes) -> None:
    for work, result, error, cancel in outcomes:
        if work.future.done():
            continue
        if cancel:
            work.future.cancel()
        elif error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)
