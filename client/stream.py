"""SpanStream: one open inference stream to one peer, for one hop of a route.

Owns the framing of `open`, `step` and `close` on the client side and checks every reply strictly:
a malformed or non-finite result is the peer's failure (PeerError naming it), never used.

Server-to-server steps: `step(..., push=route)` asks the peer to send its output on to the next hops
itself; `forwarded_step` then waits for a hop's result without sending anything, and sends the step
itself (marked "fallback") only if the result has not come within the forward wait.

Rollback: `rollback(position)` sends the message and returns at once; its reply comes in order before
the next step's result, which reads (and checks) it first, so a rollback costs no round trip of its own.
"""

from __future__ import annotations

import asyncio
import math

import torch

from client.routing import Hop
from swarm.errors import PeerError, PeerFull, PeerRefused, ProtocolError
from swarm.protocol import (
    ERROR_FULL,
    INFERENCE_HANDLER,
    PROTOCOL_MINOR,
    WIRE_DTYPES,
    all_finite,
    pack_tensor,
    push_token,
    read_message,
    require,
    unpack_tensor,
    write_message,
)

REPLY_MAX_BYTES = 1 << 30
READ_ERRORS = (asyncio.IncompleteReadError, ConnectionError, ProtocolError)


def _read_failure(error: BaseException, hop: Hop) -> PeerError:
    """A reply that could not be read: the stream closed, or what came was malformed."""
    if isinstance(error, ProtocolError):
        return PeerError(f"malformed reply: {error}", peer=hop.peer_id)
    return PeerError(f"stream closed: {error!r}", peer=hop.peer_id)


def _raise_refusal(reply: dict, hop: Hop) -> None:
    if reply.get("type") == "error":
        kind = PeerFull if reply.get("code") == ERROR_FULL else PeerRefused
        raise kind(f"peer error ({reply.get('code')}): {reply.get('message')}", peer=hop.peer_id)


class SpanStream:
    """One open inference stream to one peer for blocks [hop.span.start, hop.span.end)."""

    def __init__(self, hop: Hop, reader, writer, dtype: torch.dtype, config, opened: dict | None = None):
        self.hop = hop
        self.reader, self.writer = reader, writer
        self.dtype = dtype
        self.config = config
        opened = opened or {}
        self.session_id = opened.get("session")
        self.wire_dtype = opened.get("dtype")
        # a peer that takes forwarded steps gives a key for them; older peers give none
        key = opened.get("push_key")
        self.push_key = key if isinstance(key, str) and type(self.session_id) is int else None
        minor = opened.get("minor")
        self.minor = minor if type(minor) is int and minor >= 0 else 1  # the peer's (older peers: 1 or less)
        self.steps = 0
        self.pushed = False  # whether the peer pushed the last step's output on to the next hop
        self.drain_deadline: float | None = None  # set when the peer says in-band that it is leaving
        self._reading: asyncio.Future | None = None  # the read of the next reply, never cut mid-message
        self._rollbacks: list[int] = []  # positions of rollbacks sent whose replies were not read yet

    @classmethod
    async def open(cls, transport, hop: Hop, addrs, model_id: str, batch_size: int, max_length: int, config,
                   wait_s: float | None = None):
        """Open a session on hop's peer; `wait_s`: how long it may wait for KV room (None: as long as the
        peer's admission time), then PeerFull."""
        reader, writer = await transport.open_stream(hop.peer_id, addrs, INFERENCE_HANDLER, config.connect_timeout_s)
        try:
            message = {
                "type": "open", "minor": PROTOCOL_MINOR, "model_id": model_id,
                "blocks": [hop.span.start, hop.span.end], "batch_size": batch_size, "max_length": max_length,
            }
            if wait_s is not None:
                message["wait_s"] = wait_s
            await write_message(writer, message)
            reply = await cls._reply(reader, hop, config.connect_timeout_s)
            dtype = reply.get("dtype")
            if reply.get("type") != "opened" or dtype not in WIRE_DTYPES:
                raise PeerError(f"bad answer to open: type {reply.get('type')!r}, dtype {dtype!r}", peer=hop.peer_id)
        except BaseException:
            writer.close()
            raise
        return cls(hop, reader, writer, WIRE_DTYPES[dtype], config, reply)

    @staticmethod
    async def _reply(reader, hop: Hop, timeout_s: float) -> dict:
        """The reply to `open` (nothing else can be in flight yet); a failure is the peer's."""
        try:
            reply = await asyncio.wait_for(read_message(reader, REPLY_MAX_BYTES), timeout=timeout_s)
        except TimeoutError:
            raise PeerError(f"no reply within {timeout_s} s", peer=hop.peer_id) from None
        except READ_ERRORS as e:
            raise _read_failure(e, hop) from None
        _raise_refusal(reply, hop)
        return reply

    def push_target(self, pusher: str, position: int, ahead: int = 0) -> dict | None:
        """Where peer `pusher` pushes this hop's step at `position` (None if this peer takes no forwarded
        steps); its token is good for that pusher and that position only. `ahead`: steps of this hop
        before that one whose results were not read yet."""
        if self.push_key is None:
            return None
        return {"peer": self.hop.peer_id, "session": self.session_id, "token": push_token(self.push_key, pusher, position),
                "step": self.steps + ahead, "dtype": self.wire_dtype, "minor": self.minor}

    async def step(self, hidden, position_ids, valid, position: int, push=(), fallback: bool = False) -> torch.Tensor:
        """Send one step; return the peer's output hidden states ([batch, new, hidden], our dtype).
        `push`: the route's next hops (push targets) for the peer to send its output to."""
        await self._send(hidden, position_ids, valid, position, push, fallback)
        return await self.result(hidden, position)

    async def send(self, hidden, position_ids, valid, position: int, push=(), ahead: int = 0) -> None:
        """Send a step without waiting for its result (`ahead`: steps sent before it whose results were
        not read yet); `result` reads the results in order."""
        await self._send(hidden, position_ids, valid, position, push, fallback=False, ahead=ahead)

    async def result(self, hidden, position: int) -> torch.Tensor:
        """The result of the oldest step sent whose result was not read yet (after any rollbacks' replies)."""
        await self._rolled_back()
        return await self._result(hidden, position, self._timeout_s(hidden))

    def prefetch(self) -> None:
        """Start reading the next reply now (a later read gets it): a peer never waits on us to write."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(read_message(self.reader, REPLY_MAX_BYTES))

    async def rollback(self, position: int) -> None:
        """Ask the peer to hold only the session's first `position` tokens; the reply is read (and checked)
        by the next step. Raises ConnectionError if the stream is broken."""
        await write_message(self.writer, {"type": "rollback", "minor": PROTOCOL_MINOR, "position": position})
        self._rollbacks.append(position)

    async def _rolled_back(self) -> None:
        """Read the replies of the rollbacks sent since the last result: each must confirm its position."""
        while self._rollbacks:
            try:
                reply = await self._await_reply(self.config.step_timeout_s)
            except TimeoutError:
                raise PeerError(f"no reply to a rollback within {self.config.step_timeout_s} s",
                                peer=self.hop.peer_id) from None
            _raise_refusal(reply, self.hop)
            expected = self._rollbacks.pop(0)
            if reply.get("type") != "rolled_back" or reply.get("position") != expected:
                raise PeerError(f"answer to a rollback to {expected}: type {reply.get('type')!r}, position "
                                f"{reply.get('position')!r}", peer=self.hop.peer_id)
            deadline = reply.get("drain_deadline")
            if type(deadline) in (int, float) and math.isfinite(deadline):
                self.drain_deadline = float(deadline)

    async def forwarded_step(self, hidden, position_ids, valid, position: int, push=()) -> torch.Tensor:
        """The result of a step the previous peer pushed here; `hidden` etc. are what it pushed (the
        client's copy). Sends the step itself (fallback) if no result comes within the forward wait."""
        await self._rolled_back()
        tokens = hidden.shape[0] * hidden.shape[1]
        wait_s = self.config.forward_wait_s + tokens * self.config.step_timeout_per_token_s
        try:
            reply = await self._await_reply(wait_s)
        except TimeoutError:
            await self._send(hidden, position_ids, valid, position, push, fallback=True)
            return await self._result(hidden, position, self._timeout_s(hidden))
        return self._check(reply, hidden, position)

    def _timeout_s(self, hidden) -> float:
        return self.config.step_timeout_s + hidden.shape[0] * hidden.shape[1] * self.config.step_timeout_per_token_s

    async def _send(self, hidden, position_ids, valid, position: int, push, fallback: bool, ahead: int = 0) -> None:
        message = {
            "type": "step", "minor": PROTOCOL_MINOR, "step": self.steps + ahead, "position": position,
            "hidden": pack_tensor(hidden.to(self.dtype)), "position_ids": pack_tensor(position_ids),
            "valid": pack_tensor(valid),
        }
        if push:
            message["push"] = list(push)
        if fallback:
            message["fallback"] = True
        await write_message(self.writer, message)

    async def _await_reply(self, timeout_s: float) -> dict:
        """The next reply. On TimeoutError the read goes on (a later call gets the same reply), so a
        message is never cut in the middle; a closed stream or a malformed reply is the peer's PeerError."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(read_message(self.reader, REPLY_MAX_BYTES))
        try:
            async with asyncio.timeout(timeout_s):  # the read itself goes on past a timeout (shielded)
                reply = await asyncio.shield(self._reading)
        except READ_ERRORS as e:
            raise _read_failure(e, self.hop) from None
        self._reading = None
        return reply

    async def _result(self, hidden, position: int, timeout_s: float) -> torch.Tensor:
        try:
            reply = await self._await_reply(timeout_s)
        except TimeoutError:
            raise PeerError(f"no reply within {timeout_s} s", peer=self.hop.peer_id) from None
        return self._check(reply, hidden, position)

    def _check(self, reply: dict, hidden, position: int) -> torch.Tensor:
        """Error replies raise; a result must be this step's (step id, position after it) and is checked
        strictly, then returned as a tensor."""
        _raise_refusal(reply, self.hop)
        try:
            out = unpack_tensor(reply.get("hidden"), "hidden", rank=3)
            deadline = reply.get("drain_deadline")
            if deadline is not None:
                self.drain_deadline = float(require(deadline, float, "drain_deadline"))
        except ProtocolError as e:
            raise PeerError(f"malformed result: {e}", peer=self.hop.peer_id) from None
        if out.dtype != self.dtype or out.shape != hidden.shape or not all_finite(reply["hidden"]):
            raise PeerError(f"result of shape {list(out.shape)} (expected {list(hidden.shape)}) or not finite",
                            peer=self.hop.peer_id)
        end = position + hidden.shape[1]
        if reply.get("step") != self.steps or reply.get("position") != end:
            raise PeerError(f"result for step {reply.get('step')!r} at {reply.get('position')!r}, expected step "
                            f"{self.steps} at {end}", peer=self.hop.peer_id)
        self.pushed = reply.get("pushed") is True
        self.steps += 1
        return out

    async def close(self) -> None:
        """Say goodbye if the stream still works; never waits more than a second (a hung peer)."""
        try:
            await asyncio.wait_for(write_message(self.writer, {"type": "close"}), timeout=1)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            if self._reading is not None:
                self._reading.cancel()
            self.writer.close()
