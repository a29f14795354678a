"""SessionManager: inference sessions on this peer, and admission to the KV budget they draw from.

Admission cannot deadlock: a session is let in only when the budget can serve the growth of every
open session up to what each may still use, its own included. A session declares `max_length` at open
and the peer holds it to that (peer.requests), so a session of `rows` rows can never hold more than
`KVCache.max_nbytes` (its max_length in whole pages, per row); admission keeps the sum of that over the
open sessions (`committed_bytes`) within the budget. Pages are still taken only as a session grows
(peer.scheduler, swarm.runtime.cache), so memory holds what is cached, not the worst case; the worst case
is what admission counts. Why not overcommit and preempt: on a swarm short of memory a preempted session
has nowhere to go, and it would fail mid-generation; counting the worst case turns that into a refusal
up front, where the client picks another peer (the declared length of `generate` is prompt +
max_new_tokens, so the count is tight).

A session whose worst case exceeds the whole budget is refused at once; one that fits a budget others
have committed waits up to `admission_timeout_s` (or less, if the client asks: see client.session's
opening of a route) for sessions to close, then is refused with PeerFull naming the budget. Never evicts
a running session. Every session is released exactly once (close on stream end, crash of the stream, or
idle expiry). `wait_empty()` lets a draining peer wait for its last
session; open/close run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm.errors import PeerFull, PeerRefused
from swarm.runtime import KVBudget, KVCache

from peer.config import PeerConfig

ADMISSION_POLL_S = 0.05


@dataclass
class Session:
    session_id: int
    client_id: str
    blocks: tuple[int, int]
    batch_size: int
    max_length: int
    cache: KVCache
    last_used_s: float = field(default_factory=time.monotonic)
    # server-to-server steps: the key a previous peer must show to push steps here (told to the client
    # in "opened"), the steps waiting to run (("client" | "forward", message or exception, whether it
    # ends a pushed batch)), and the position of the last step that ran from a forwarded copy (its
    # client fallback copy is dropped)
    push_key: str = field(default_factory=lambda: secrets.token_hex(16))
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    forwarded_at: int | None = None
    forwards_queued: int = 0  # forwarded steps in the inbox (bounded; client messages are bounded apart)
    stepping: asyncio.Future | None = None  # the scheduler's future of the step running now, if any
    ended: BaseException | None = None  # why the session must stop (its client left, or it idled too long)

    @property
    def position(self) -> int:
        return self.cache.length

    def rollback(self, position: int) -> None:
        """Hold only the first `position` cache slots (0 <= position <= self.position, checked by
        peer.requests.parse_rollback); called between steps, never while one of this session's steps runs.
        A forwarded step that ran at or after `position` is forgotten: the client's copy of a step there is a
        new step, not a duplicate of it."""
        self.cache.truncate(position)
        if self.forwarded_at is not None and self.forwarded_at >= position:
            self.forwarded_at = None

    def end(self, reason: BaseException) -> None:
        """Stop this session's handler at once: its next inbox read, or the step it waits on, raises
        `reason` (the handler then closes the session, which drops its queued steps)."""
        if self.ended is None:
            self.ended = reason
            self.inbox.put_nowait(("client", reason, False))
            if self.stepping is not None:
                self.stepping.cancel()


class SessionManager:
    def __init__(
        self,
        config: PeerConfig,
        budget: KVBudget,
        span_token_bytes: int,
        new_cache: Callable[[int, int, tuple[int, int]], KVCache],
        release: Callable[[KVCache], None],
        memory_waiters: Callable[[], bool] = lambda: False,
    ):
        self.config = config
        self.budget = budget
        self.span_token_bytes = span_token_bytes  # one cached token of one row over the whole span
        self._new_cache = new_cache  # (rows, max_length, blocks) -> KVCache on `budget`
        self._release = release  # gives a cache's pages back once no step runs on it
        self._memory_waiters = memory_waiters
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._empty = asyncio.Event()  # set exactly while no session is open
        self._empty.set()

    @property
    def committed_bytes(self) -> int:
        """KV bytes the open sessions may still come to hold (each one's max_nbytes), summed."""
        return sum(s.cache.max_nbytes for s in self._sessions.values())

    @property
    def cache_tokens_left(self) -> int:
        """Token slots (one row, whole span) a new session could still be admitted with."""
        return max(0, self.budget.total_bytes - self.committed_bytes) // self.span_token_bytes

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        """Token slots in use (rows x length), over all sessions."""
        return sum(s.cache.tokens for s in self._sessions.values())

    def admissible(self, cache: KVCache) -> bool:
        """Whether the budget can serve `cache` growing to its worst case beside every open session's."""
        return not self._memory_waiters() and self.committed_bytes + cache.max_nbytes <= self.budget.total_bytes

    def check_limits(self, client_id: str, batch_size: int, max_length: int) -> None:
        c = self.config
        if max_length > c.max_session_length_tokens:
            raise PeerRefused(
                f"session length {max_length} exceeds this peer's limit of {c.max_session_length_tokens} tokens"
            )
        if batch_size > c.max_batch_size:
            raise PeerRefused(f"batch size {batch_size} exceeds this peer's limit of {c.max_batch_size}")
        if sum(s.client_id == client_id for s in self._sessions.values()) >= c.max_sessions_per_client:
            raise PeerRefused(f"client already has {c.max_sessions_per_client} sessions open on this peer")

    async def open(self, client_id: str, blocks: tuple[int, int], batch_size: int, max_length: int,
                   wait_s: float | None = None) -> Session:
        """Admit a session (waiting up to admission_timeout_s, or `wait_s` if less, for KV memory) or raise
        PeerRefused (PeerFull if the budget is committed to other sessions)."""
        self.check_limits(client_id, batch_size, max_length)
        cache = self._new_cache(batch_size, max_length, blocks)  # holds no memory until it grows
        if cache.max_nbytes > self.budget.total_bytes:
            raise PeerRefused(
                f"a session of {max_length} tokens x {batch_size} rows on blocks {blocks[0]}:{blocks[1]} may need "
                f"{cache.max_nbytes} KV bytes, more than this peer's whole budget of {self.budget.total_bytes}; "
                "shorten the session or use a peer with more memory"
            )
        wait_s = self.config.admission_timeout_s if wait_s is None else min(wait_s, self.config.admission_timeout_s)
        deadline = time.monotonic() + wait_s
        while not self.admissible(cache):
            if time.monotonic() >= deadline:
                raise PeerFull(
                    f"cache full: {self.committed_bytes} of {self.budget.total_bytes} KV bytes are committed to "
                    f"{self.active} sessions, {cache.max_nbytes} more needed (waited {wait_s:g} s); try another peer"
                )
            await asyncio.sleep(ADMISSION_POLL_S)
        self.check_limits(client_id, batch_size, max_length)  # others may have opened while we waited
        session = Session(next(self._ids), client_id, blocks, batch_size, max_length, cache)
        self._sessions[session.session_id] = session
        self._empty.clear()
        return session

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def close(self, session: Session | None) -> None:
        if session is not None and self._sessions.pop(session.session_id, None) is not None:
            self._release(session.cache)
            if not self._sessions:
                self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no session is open (at once if none is); bound it with a timeout."""
        await self._empty.wait()

    def expired(self, now_s: float | None = None) -> list[Session]:
        now_s = time.monotonic() if now_s is None else now_s
        return [s for s in self._sessions.values() if now_s - s.last_used_s > self.config.session_idle_timeout_s]
