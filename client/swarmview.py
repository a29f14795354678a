"""The client's view of the swarm between DHT reads: routing candidates from a snapshot, the cached
snapshot itself, and measured round trips to peers."""

from __future__ import annotations

import asyncio
import logging
import time

from client.routing import Candidate
from swarm.errors import PeerError, ProtocolError
from swarm.protocol import INFO_HANDLER
from swarm.records import BlockRecord
from swarm.spans import Span

logger = logging.getLogger(__name__)


def peer_records(snapshot: dict) -> dict[str, BlockRecord]:
    """One record per peer from a DHT snapshot {block: {peer_id: BlockRecord}} (every block's record of
    a peer carries the same span and load), sorted by peer id."""
    seen: dict[str, BlockRecord] = {}
    for block_records in snapshot.values():
        for peer_id, record in block_records.items():
            seen.setdefault(peer_id, record)
    return dict(sorted(seen.items()))


def candidate(peer_id: str, r: BlockRecord, latency_s: float | None) -> Candidate:
    """A routing candidate from a peer's record; latency None = not measured (the planner guesses). Its
    precision is the record's lowest (quantized weights or an fp8 KV cache; records before schema 1.3 read
    as their dtype's bits, or 8 where they name a quantization)."""
    return Candidate(
        peer_id=peer_id, span=Span(r.start, r.end), state=r.state,
        compute_tokens_s=max(r.compute_tokens_s, 1e-3), latency_s=latency_s,
        active_sessions=r.active_sessions, queued_tokens=r.queued_tokens, cache_tokens_left=r.cache_tokens_left,
        precision_bits=r.precision_bits,
    )


class SnapshotCache:
    """The last DHT snapshot of the model's blocks, reused for `max_age_s` (routing and recovery)."""

    def __init__(self, max_age_s: float = 30.0, clock=time.monotonic):
        self.max_age_s = max_age_s
        self.clock = clock
        self._value: tuple[float, dict] | None = None

    def get(self) -> dict | None:
        if self._value is None or self.clock() - self._value[0] > self.max_age_s:
            return None
        return self._value[1]

    def put(self, snapshot: dict) -> None:
        self._value = (self.clock(), snapshot)


class LatencyTable:
    """Measured round trips to peers, reused for `max_age_s` before measuring again. A round trip is an
    `info` request and its reply on a stream already open: the dial, TCP, TLS and the direct handshake
    before it take several round trips more on a fresh connection, a multiple that would make a far peer
    look costlier than its distance against the compute terms the planner weighs it with."""

    def __init__(self, max_age_s: float = 60.0, clock=time.monotonic):
        self.max_age_s = max_age_s
        self.clock = clock
        self._rtt: dict[str, tuple[float, float]] = {}  # peer id -> (seconds, measured at)

    def known(self) -> dict[str, float]:
        return {peer: rtt for peer, (rtt, _) in self._rtt.items()}

    def stale(self, peers) -> list[str]:
        now = self.clock()
        return [p for p in peers if p not in self._rtt or now - self._rtt[p][1] > self.max_age_s]

    async def measure(self, transport, addrs: dict[str, list[str]], timeout_s: float) -> None:
        """Ping every stale peer concurrently; an unreachable peer is recorded with the timeout as its RTT."""
        peers = self.stale(addrs)

        async def ping(peer_id: str) -> None:
            try:
                _, rtt = await transport.timed_request(peer_id, addrs[peer_id], INFO_HANDLER, {"type": "info"},
                                                       timeout_s)
            except (PeerError, ProtocolError) as e:
                logger.info("peer %s did not answer info: %s", peer_id, e)
                rtt = timeout_s
            self._rtt[peer_id] = (rtt, self.clock())

        await asyncio.gather(*(ping(p) for p in peers))
