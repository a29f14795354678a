"""Server-to-server steps: a session's stream to the next peer of its client's route.

After a step runs, the peer sends its output on to the next hop (FORWARD_HANDLER) before replying to
its client, so the next peer can start without waiting for the client's round trip. One `ForwardLink`
per session keeps that stream open across steps and opens a new one when the client's route changes
(failover). A push that cannot be made is reported (`send` returns False) and the client sends the
step itself: a broken next hop costs the old client round trip, never a lost step. A write that timed
out may still arrive; the next peer then drops the client's copy (it is marked "fallback").
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

from hivemind.p2p import PeerID

from swarm.direct import DirectDialer
from swarm.net import connect
from swarm.protocol import FORWARD_HANDLER, PROTOCOL_MINOR, write_message

from peer.requests import PushTarget

logger = logging.getLogger(__name__)


@dataclass
class ForwardStats:
    """Counts for `info` (tests and the health page read them)."""

    pushed: int = 0  # steps this peer sent on to the next hop
    push_failed: int = 0  # pushes that could not be made (the client sent those steps itself)
    received: int = 0  # forwarded steps that ran here
    rejected: int = 0  # forwarded steps for no session here, or whose token does not fit pusher and position
    dropped: int = 0  # forwarded steps that failed the step decoder (the client then sends the step itself)
    duplicates: int = 0  # copies dropped: a forwarded step after the client's own, or a fallback after the forward

    def as_dict(self) -> dict:
        return asdict(self)


RETRY_AFTER_S = 30.0  # after a failed push, this session pushes to that peer again only after this long


class ForwardLink:
    """`record_of(peer_id)`: the next peer's own signed DHT record of the next block, which says where it
    can be dialed: its direct TLS port first (swarm.direct), else through p2pd (None when there is no
    record: then only what p2pd already knows of that peer is tried). Never addresses from the client,
    which could otherwise make a peer dial anything."""

    def __init__(self, p2p, dialer: DirectDialer | None, connect_timeout_s: float, record_of):
        self.p2p = p2p
        self.dialer = dialer
        self.connect_timeout_s = connect_timeout_s
        self._record_of = record_of
        self._target: tuple[str, int] | None = None  # (peer, session) the open stream leads to
        self._writer: asyncio.StreamWriter | None = None
        self._failed: dict[str, float] = {}  # peer -> monotonic time before which no push is tried

    async def send(self, step: dict, target: PushTarget, rest: tuple[PushTarget, ...]) -> bool:
        """Push `step` (a "step" message without its route fields) to `target`; True once it is written.
        A peer that could not be reached is not tried again for RETRY_AFTER_S (False at once)."""
        if time.monotonic() < self._failed.get(target.peer, 0.0):
            return False
        message = {
            **step, "type": "step", "minor": PROTOCOL_MINOR, "session": target.session, "token": target.token,
            "step": target.step, "push": [t.as_dict() for t in rest],
        }
        try:
            if self._target != (target.peer, target.session) or self._writer is None:
                self.close()
                self._writer = await self._open(target)
                self._target = (target.peer, target.session)
            async with asyncio.timeout(self.connect_timeout_s):
                await write_message(self._writer, message)
            return True
        except Exception as e:  # any failure to reach the next hop: the client sends the step instead
            logger.info("could not push a step to %s: %r", target.peer[-6:], e)
            self._failed[target.peer] = time.monotonic() + RETRY_AFTER_S
            self.close()
            return False

    async def _open(self, target: PushTarget) -> asyncio.StreamWriter:
        peer_id = PeerID.from_base58(target.peer)
        try:
            record = await self._record_of(target.peer)  # bounded by its own DHT timeout
        except Exception as e:  # a DHT hiccup: p2pd may still know the peer
            logger.debug("no DHT record of %s for a push: %r", target.peer[-6:], e)
            record = None
        if record is not None and record.direct and self.dialer is not None:
            opened = await self.dialer.open_any(target.peer, record.direct, FORWARD_HANDLER, self.connect_timeout_s)
            if opened is not None:
                return opened[1]
        if record is not None and record.addrs:
            await connect(self.p2p, peer_id, record.addrs, self.connect_timeout_s)
        # no record found (yet): p2pd may still know the peer from the swarm's own traffic
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(peer_id, FORWARD_HANDLER), timeout=self.connect_timeout_s
        )
        return writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._target = None, None
