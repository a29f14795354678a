"""Network figures this peer announces: round trip and bandwidth to the peers it talks to.

Who: the peers serving the block right after this peer's span (it pushes its steps to them) and the block
right before it (they push to it), a few per round. How: two `info` requests on one connection, one
plain and one padded with PAD_BYTES (the info handler reads up to 64 KiB and ignores extra fields):
the plain one's time is the round trip, and PAD_BYTES x 8 / (padded - plain) the bandwidth towards that
peer. On loopback the difference is lost in noise (below MIN_DELTA_S the sample is dropped: bandwidth
unknown, announced as 0). The announced figures are the medians of the last WINDOW samples
(`NetworkStats`), so one slow probe does not swing them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from hivemind.p2p import P2P

from swarm import records
from swarm.errors import PeerError, ProtocolError
from swarm.net import connect
from swarm.probe import check_peer_id
from swarm.protocol import INFO_HANDLER, read_message, write_message
from swarm.records import BlockRecord
from swarm.spans import Span

logger = logging.getLogger(__name__)

PAD_BYTES = 48 * 1024
MIN_DELTA_S = 0.0005
WINDOW = 16
PEERS_PER_ROUND = 3


class NetworkStats:
    """Rolling medians of measured round trips (ms) and bandwidths (Mbit/s)."""

    def __init__(self, window: int = WINDOW):
        self._rtt_ms: deque[float] = deque(maxlen=window)
        self._mbps: deque[float] = deque(maxlen=window)

    def add(self, rtt_s: float, mbps: float | None) -> None:
        self._rtt_ms.append(rtt_s * 1000)
        if mbps is not None:
            self._mbps.append(mbps)

    @property
    def rtt_ms(self) -> float | None:
        return round(statistics.median(self._rtt_ms), 3) if self._rtt_ms else None

    @property
    def mbps(self) -> float:
        return round(min(statistics.median(self._mbps), 1e6), 3) if self._mbps else 0.0

    def as_dict(self) -> dict:
        return {"rtt_ms": self.rtt_ms, "mbps": self.mbps, "samples": len(self._rtt_ms)}


def bandwidth_mbps(plain_s: float, padded_s: float, pad_bytes: int = PAD_BYTES) -> float | None:
    """Mbit/s from a plain and a padded round trip; None when the difference is too small to tell."""
    delta = padded_s - plain_s
    return None if delta < MIN_DELTA_S else pad_bytes * 8 / delta / 1e6


async def probe(p2p: P2P, peer_id: str, addrs: Sequence[str], timeout_s: float) -> tuple[float, float | None]:
    """(round trip s, Mbit/s or None) to one peer; raises PeerError if it cannot be reached in time."""
    pid = check_peer_id(peer_id)
    try:
        async with asyncio.timeout(timeout_s):
            if addrs:
                await connect(p2p, pid, addrs, timeout_s)
            await _timed_info(p2p, pid, {})  # opens the connection: not counted
            plain = await _timed_info(p2p, pid, {})
            padded = await _timed_info(p2p, pid, {"pad": b"\0" * PAD_BYTES})
    except TimeoutError:
        raise PeerError(f"no answer to info within {timeout_s:g} s", peer=peer_id) from None
    except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
        raise PeerError(f"info probe failed: {e!r}", peer=peer_id) from e
    except Exception as e:  # p2pd reports dial failures as generic errors
        raise PeerError(f"could not reach the peer: {e!r:.200}", peer=peer_id) from e
    return plain, bandwidth_mbps(plain, padded)


async def _timed_info(p2p: P2P, pid, extra: dict) -> float:
    started = time.perf_counter()
    _, reader, writer = await p2p.call_binary_stream_handler(pid, INFO_HANDLER)
    try:
        await write_message(writer, {"type": "info", **extra})
        await read_message(reader, 64 * 1024)
    finally:
        writer.close()
    return time.perf_counter() - started


def neighbours(
    found: dict[int, dict[str, BlockRecord]], own_id: str, rng: random.Random, count: int = PEERS_PER_ROUND
) -> list[tuple[str, tuple[str, ...]]]:
    """Up to `count` online peers (id, addrs) of the neighbouring blocks' records, chosen at random."""
    peers = {
        pid: r.addrs
        for records in found.values()
        for pid, r in records.items()
        if pid != own_id and r.state == "online"
    }
    chosen = rng.sample(sorted(peers), min(count, len(peers)))
    return [(pid, peers[pid]) for pid in chosen]


async def run_probes(
    stats: NetworkStats,
    period_s: float,
    neighbour_records: Callable[[], Awaitable[dict]],
    p2p: P2P,
    own_id: str,
    timeout_s: float,
    rng: random.Random,
) -> None:
    """Probe a few neighbours every `period_s` until cancelled; failures are logged, never raised."""
    while True:
        try:
            for peer_id, addrs in neighbours(await neighbour_records(), own_id, rng):
                try:
                    stats.add(*await probe(p2p, peer_id, addrs, timeout_s))
                except PeerError as e:
                    logger.debug("network probe of %s: %s", peer_id[-6:], e)
        except Exception:  # supervisor loop: a DHT hiccup skips one round
            logger.exception("network probe round failed")
        await asyncio.sleep(period_s * rng.uniform(0.75, 1.25))


async def neighbour_records(dht, model_id: str, num_blocks: int, span: Span, timeout_s: float) -> dict:
    """Records of the blocks right before and right after `span`: the peers this one talks to."""
    blocks = [b for b in (span.start - 1, span.end) if 0 <= b < num_blocks]
    found: dict = {}
    for block in blocks:
        found |= await records.fetch_blocks(
            dht, model_id, num_blocks, blocks=range(block, block + 1), timeout_s=timeout_s
        )
    return found
