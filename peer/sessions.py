"""SessionManager: inference sessions on this peer and the KV budget they draw from.

Mutates: its own table of sessions and the budget counter. Raises PeerRefused when a new session does
not fit (budget, per-client limit, length limit); never evicts a running session to make room.
Every session is released exactly once (close on stream end, crash of the stream, or idle expiry).
`wait_empty()` lets a draining peer wait for its last session; open/close run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from swarm.errors import PeerRefused
from swarm.runtime import KVCache

from peer.config import PeerConfig


@dataclass
class Session:
    session_id: int
    client_id: str
    blocks: tuple[int, int]
    batch_size: int
    max_length: int
    cache: KVCache
    reserved_tokens: int
    last_used_s: float = field(default_factory=time.monotonic)

    @property
    def position(self) -> int:
        return self.cache.length


class SessionManager:
    def __init__(self, config: PeerConfig, new_cache):
        self.config = config
        self._new_cache = new_cache  # (batch_size, max_length) -> KVCache
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.reserved_tokens = 0
        self._empty = asyncio.Event()  # set exactly while no session is open
        self._empty.set()

    @property
    def cache_tokens_left(self) -> int:
        return self.config.cache_tokens - self.reserved_tokens

    @property
    def active(self) -> int:
        return len(self._sessions)

    def open(self, client_id: str, blocks: tuple[int, int], batch_size: int, max_length: int) -> Session:
        c = self.config
        if max_length > c.max_session_length_tokens:
            raise PeerRefused(
                f"session length {max_length} exceeds this peer's limit of {c.max_session_length_tokens} tokens"
            )
        if batch_size > c.max_batch_size:
            raise PeerRefused(f"batch size {batch_size} exceeds this peer's limit of {c.max_batch_size}")
        if sum(s.client_id == client_id for s in self._sessions.values()) >= c.max_sessions_per_client:
            raise PeerRefused(f"client already has {c.max_sessions_per_client} sessions open on this peer")
        need = batch_size * max_length
        if need > self.cache_tokens_left:
            raise PeerRefused(f"cache full: session needs {need} token slots, {self.cache_tokens_left} left")
        session = Session(next(self._ids), client_id, blocks, batch_size, max_length,
                          self._new_cache(batch_size, max_length), need)
        self._sessions[session.session_id] = session
        self.reserved_tokens += need
        self._empty.clear()
        return session

    def close(self, session: Session | None) -> None:
        if session is not None and self._sessions.pop(session.session_id, None) is not None:
            self.reserved_tokens -= session.reserved_tokens
            if not self._sessions:
                self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no session is open (at once if none is); bound it with a timeout."""
        await self._empty.wait()

    def expired(self, now_s: float | None = None) -> list[Session]:
        now_s = time.monotonic() if now_s is None else now_s
        return [s for s in self._sessions.values() if now_s - s.last_used_s > self.config.session_idle_timeout_s]
