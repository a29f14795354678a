"""Server-to-server steps: each step's output goes on to the next peer of its client's route.

After a step runs, the peer sends its output on to the next hop (FORWARD_HANDLER) before replying to
its client, so the next peer can start without waiting for the client's round trip. The streams are
the peer's, one per next peer, shared by the sessions pushing there (`PushChannels`); a route that
changes (failover) simply names another peer. A push that cannot be made is reported (`send` returns
False) and the client sends the step itself: a broken next hop costs the old client round trip, never
a lost step. A write that timed out may still arrive; the next peer then drops the client's copy (it is
marked "fallback").
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

from hivemind.p2p import PeerID

from swarm.direct import DirectDialer
from swarm.net import connect
from swarm.protocol import BATCH_MINOR, FORWARD_HANDLER, PROTOCOL_MINOR, write_frames

from peer.requests import PushTarget

logger = logging.getLogger(__name__)


@dataclass
class ForwardStats:
    """Counts for `info` (tests and the health page read them)."""

    pushed: int = 0  # steps this peer sent on to the next hop
    push_messages: int = 0  # messages those steps travelled in (a batch of a forward's steps counts once)
    push_failed: int = 0  # pushes that could not be made (the client sent those steps itself)
    received: int = 0  # forwarded steps that ran here
    rejected: int = 0  # forwarded steps for no session here, or whose token does not fit pusher and position
    dropped: int = 0  # forwarded steps that failed the step decoder (the client then sends the step itself)
    duplicates: int = 0  # copies dropped: a forwarded step after the client's own, or a fallback after the forward
    overflowed: int = 0  # forwarded steps dropped because their session already held FORWARD_BACKLOG of them

    def as_dict(self) -> dict:
        return asdict(self)


RETRY_AFTER_S = 30.0  # after a failed push, this session pushes to that peer again only after this long
BATCHED_STEP_BYTES = 64 << 10  # steps whose hidden states are at most this big travel batched (decode steps)
BATCH_BYTES = 1 << 20  # hidden states in one batched message at most (a bigger cohort takes several)


class ForwardLink:
    """One session's pushes: what it may still push to (a peer that failed it waits RETRY_AFTER_S), through
    the peer's shared `PushChannels`."""

    def __init__(self, channels: PushChannels, next_block: int):
        self.channels = channels
        self.next_block = next_block
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
        batched = target.minor >= BATCH_MINOR and len(step["hidden"]["data"]) <= BATCHED_STEP_BYTES
        if await self.channels.send(target.peer, self.next_block, message, batched):
            return True
        self._failed[target.peer] = time.monotonic() + RETRY_AFTER_S
        return False


class PushChannels:
    """The streams this peer pushes steps on, one per next peer (and one more for steps above
    BATCHED_STEP_BYTES, so a prompt's megabytes never hold up the decode steps behind it), shared by every
    session that pushes there.

    Batching: the steps of one forward come back to their sessions in one turn of the event loop, and
    every session pushes before it replies, so a channel writes what its sessions handed it in that turn
    as one "steps" message: one encode and one write for the whole cohort instead of one per session,
    and the next peer gets the cohort at once (its scheduler then runs it without waiting for more).

    `record_of(peer_id, next_block)`: the next peer's own signed DHT record of that block, which says
    where it can be dialed: its direct TLS port first (swarm.direct), else through p2pd (None when there
    is no record: then only what p2pd already knows of that peer is tried). Never addresses from the
    client, which could otherwise make a peer dial anything."""

    def __init__(self, p2p, dialer: DirectDialer | None, connect_timeout_s: float, record_of, stats: ForwardStats):
        self.p2p = p2p
        self.stats = stats
        self.dialer = dialer
        self.connect_timeout_s = connect_timeout_s
        self._record_of = record_of
        self._channels: dict[tuple[str, bool], _Channel] = {}

    async def send(self, peer: str, next_block: int, message: dict, batched: bool) -> bool:
        """Write `message` to `peer` (with the other batched steps of this turn when `batched`); True once
        written, False if the peer could not be reached or the write failed."""
        key = (peer, batched)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel(self, peer, next_block, batched)
        return await channel.send(message)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    async def open(self, peer: str, next_block: int) -> asyncio.StreamWriter:
        peer_id = PeerID.from_base58(peer)
        try:
            record = await self._record_of(peer, next_block)  # bounded by its own DHT timeout
        except Exception as e:  # a DHT hiccup: p2pd may still know the peer
            logger.debug("no DHT record of %s for a push: %r", peer[-6:], e)
            record = None
        if record is not None and record.direct and self.dialer is not None:
            opened = await self.dialer.open_any(peer, record.direct, FORWARD_HANDLER, self.connect_timeout_s)
            if opened is not None:
                return opened[1]
        if record is not None and record.addrs:
            await connect(self.p2p, peer_id, record.addrs, self.connect_timeout_s)
        # no record found (yet): p2pd may still know the peer from the swarm's own traffic
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(peer_id, FORWARD_HANDLER), timeout=self.connect_timeout_s
        )
        return writer


class _Channel:
    """One stream to one next peer. `send` queues a message; one writer task at a time drains the queue:
    everything queued when it runs goes out (batched: as one "steps" message), and each sender learns
    whether its message was written."""

    def __init__(self, channels: PushChannels, peer: str, next_block: int, batched: bool):
        self.channels, self.peer, self.next_block, self.batched = channels, peer, next_block, batched
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._writing: asyncio.Task | None = None

    async def send(self, message: dict) -> bool:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((message, future))
        if self._writing is None:
            # started after the sessions woken with this one have queued their steps (call_soon order)
            self._writing = asyncio.get_running_loop().create_task(self._write_queued())
        return await future

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                queued, self._queue = self._queue, []
                ok = await self._write([m for m, _ in queued])
                for _, future in queued:  # written: the senders reply to their clients now, not after the drain
                    if not future.done():
                        future.set_result(ok)
                if ok:
                    await self._drain()  # the next batch waits while the next peer is slow to read
        finally:
            self._writing = None
            for _, future in self._queue:  # cancelled meanwhile (the peer is stopping)
                future.cancel()

    async def _write(self, messages: list[dict]) -> bool:
        """Hand the messages to the stream's transport (opening the stream first if it has none); False if
        that failed. What is handed over may still be lost if the stream breaks before it is sent: the
        clients then send those steps themselves after their forward wait."""
        try:
            if self._writer is None or self._writer.is_closing():
                async with asyncio.timeout(self.channels.connect_timeout_s):
                    self._writer = await self.channels.open(self.peer, self.next_block)
            for part in _batches(messages) if self.batched else messages:
                write_frames(self._writer, {"type": "steps", "minor": PROTOCOL_MINOR, "steps": part}
                             if self.batched else part)
                self.channels.stats.push_messages += 1
            return True
        except Exception as e:  # any failure to reach the next hop: the clients send these steps instead
            logger.info("could not push %d step(s) to %s: %r", len(messages), self.peer[-6:], e)
            self.close()
            return False

    async def _drain(self) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            async with asyncio.timeout(self.channels.connect_timeout_s):
                await writer.drain()
        except Exception as e:
            logger.info("pushes to %s did not drain: %r", self.peer[-6:], e)
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None


def _batches(messages: list[dict]) -> list[list[dict]]:
    """`messages` in order, cut into batches of at most BATCH_BYTES of hidden states each."""
    out: list[list[dict]] = [[]]
    size = 0
    for message in messages:
        step_bytes = len(message["hidden"]["data"])
        if out[-1] and size + step_bytes > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(message)
        size += step_bytes
    return out
