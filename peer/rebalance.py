"""The shells around peer.placement: choosing a span when joining, and moving later (rebalancing).

Both read the swarm through `read()` (a fresh SwarmSnapshot from the DHT), and take their clock and
randomness from the caller (`sleep`, `rng`), so tests drive them with a fake clock and a seeded Random.

Joining (`place_on_join`): choose the weakest window, announce `joining` there at once, wait a random
[jitter/2, jitter], read again and re-choose yielding to joining peers with a lower peer id
(placement.rechoose); if the choice changed, announce `joining` at the new span. Returns the span.

Rebalancing (`Rebalancer.run`): every period (randomized +-25% so that peers started together drift
apart), if the peer is online, decide (placement.rebalance_target); if it should move, wait a random
delay in [0, delay_s], read again and decide again on both reads together (another peer may have moved
meanwhile; and a DHT read may miss some records, which makes a block look weaker than it is: a peer seen
by either read counts, as the later read saw it), and only then move (`move(target)`: drain at a step
boundary, load, announce; see PeerServer.move_to). A failed read is logged and the check skipped; a
failed move ends the loop through `on_fatal`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from swarm import records
from swarm.spans import Span

from peer.placement import (
    MoveDecision,
    SwarmSnapshot,
    choose_span,
    coverage,
    rebalance_target,
    rechoose,
    snapshot_of,
)

logger = logging.getLogger(__name__)

Read = Callable[[], Awaitable[SwarmSnapshot]]
Sleep = Callable[[float], Awaitable[None]]


def typical_tokens_s(snapshot: SwarmSnapshot, default: float = 1.0) -> float:
    """Per-block throughput to announce while joining before a first measurement: the median of the
    others' (a new peer of unknown speed counts as a typical one), `default` in an empty swarm."""
    figures = [p.span_tokens_s * p.span.length for p in snapshot.peers if p.counts_on is not None]
    return statistics.median(figures) if figures else default


async def place_on_join(
    snapshot: SwarmSnapshot,
    read: Read,
    announce_joining: Callable[[Span], Awaitable[None]],
    peer_id: str,
    length: int,
    jitter_s: float,
    rng: random.Random,
    sleep: Sleep = asyncio.sleep,
) -> Span:
    """Choose this peer's span of `length` blocks from `snapshot` and announce it (module docstring)."""
    span = choose_span(coverage(snapshot.without(peer_id)), length)
    await announce_joining(span)
    if jitter_s <= 0:
        return span
    await sleep(rng.uniform(jitter_s / 2, jitter_s))
    again = rechoose(await read(), peer_id, length)
    if again != span:
        logger.info("joining: %s instead of %s (a peer with a lower id chose it too)", again, span)
        await announce_joining(again)
    return again


@dataclass(frozen=True)
class PeerPosition:
    """What the rebalancer needs of its own peer now. `movable`: online, not leaving, span chosen by it."""

    peer_id: str
    span: Span
    span_tokens_s: float
    movable: bool


class Rebalancer:
    def __init__(
        self,
        *,
        period_s: float,
        margin: float,
        delay_s: float,
        read: Read,
        position: Callable[[], PeerPosition],
        move: Callable[[Span], Awaitable[None]],
        rng: random.Random,
        sleep: Sleep = asyncio.sleep,
        on_fatal: Callable[[str], None] = lambda reason: None,
        say: Callable[[str], None] = lambda line: logger.info("%s", line),
    ):
        self.period_s, self.margin, self.delay_s = period_s, margin, delay_s
        self._read, self._position, self._move = read, position, move
        self._rng, self._sleep, self._on_fatal, self._say = rng, sleep, on_fatal, say
        self.moves = 0

    def _decide(self, snapshot: SwarmSnapshot) -> MoveDecision | None:
        me = self._position()
        if not me.movable:
            return None
        return rebalance_target(snapshot, me.peer_id, me.span, me.span_tokens_s, self.margin)

    async def check(self) -> Span | None:
        """One check: the span to move to now (after the randomized delay and the re-check), or None."""
        seen = await self._read()
        first = self._decide(seen)
        if first is None or first.target is None:
            return None
        await self._sleep(self._rng.uniform(0, self.delay_s))
        second = self._decide(seen.union(await self._read()))
        if second is None or second.target is None:
            logger.info(
                "rebalance: moving to %s no longer helps after the delay (%s)",
                first.target,
                second.reason if second else "not movable now",
            )
            return None
        self._say(f"rebalancing: moving to blocks {second.target}: {second.reason}")
        return second.target

    async def run(self) -> None:
        """Check every period until cancelled; move when a check says so."""
        while True:
            await self._sleep(self.period_s * self._rng.uniform(0.75, 1.25))
            try:
                target = await self.check()
            except Exception:  # supervisor loop: a DHT hiccup skips one check
                logger.exception("rebalance check failed; trying again next period")
                continue
            if target is None:
                continue
            try:
                await self._move(target)
            except Exception as e:
                logger.exception("moving to %s failed", target)
                self._on_fatal(f"moving to blocks {target} failed: {e}")
                return
            self.moves += 1


async def read_snapshot(dht, model_id: str, num_blocks: int, timeout_s: float) -> SwarmSnapshot:
    """The model's block records as placement sees them (records.fetch_block_entries, then snapshot_of)."""
    from swarm.net import remember_addrs

    entries = await records.fetch_block_entries(dht, model_id, num_blocks, timeout_s=timeout_s)
    remember_addrs(dht, {block: {peer: record for peer, (record, _) in found.items()}
                         for block, found in entries.items()})
    return snapshot_of(entries, num_blocks)
