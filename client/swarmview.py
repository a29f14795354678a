"""The client's view of the swarm between DHT reads: routing candidates from a snapshot, the cached
snapshot itself, and measured round trips to peers."""

from __future__ import annotations

import asyncio
import logging
import time

from client.routing import Candidate
from swarm.errors import PeerError, ProtocolError
from swarm.protocol import INFO_HANDLER
from swarm.spans import Span

logger = logging.getLogger(__name__)


def candidates_from_snapshot(
    snapshot: dict, latencies: dict[str, float] | None = None
) -> tuple[list[Candidate], dict[str, list[str]]]:
    """Routing candidates and dial addresses from a DHT snapshot {block: {peer_id: BlockRecord}}.

    `latencies` holds measured round trips (s) by peer id; peers missing from it get the planner's guess.
    """
    latencies = latencies or {}
    seen: dict[str, object] = {}
    for block_records in snapshot.values():
        for peer_id, record in block_records.items():
            seen.setdefault(peer_id, record)
    candidates, addrs = [], {}
    for peer_id, r in sorted(seen.items()):
        candidates.append(Candidate(
            peer_id=peer_id, span=Span(r.start, r.end), state=r.state,
            compute_tokens_s=max(r.compute_tokens_s, 1e-3), latency_s=latencies.get(peer_id),
            active_sessions=r.active_sessions,
            queued_tokens=r.queued_tokens, cache_tokens_left=r.cache_tokens_left,
        ))
        addrs[peer_id] = list(r.addrs)
    return candidates, addrs


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
    """Measured round trips to peers (an `info` request), reused for `max_age_s` before measuring again."""

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
            started = self.clock()
            try:
                await transport.request(peer_id, addrs[peer_id], INFO_HANDLER, {"type": "info"}, timeout_s)
                rtt = self.clock() - started
            except (PeerError, ProtocolError) as e:
                logger.info("peer %s did not answer info: %s", peer_id, e)
                rtt = timeout_s
            self._rtt[peer_id] = (rtt, self.clock())

        await asyncio.gather(*(ping(p) for p in peers))
