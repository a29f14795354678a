"""SpanStream: one open inference stream to one peer, for one hop of a route.

Owns the framing of `open`, `step` and `close` on the client side and checks every reply strictly:
a malformed or non-finite result is the peer's failure (PeerError naming it), never used.
"""

from __future__ import annotations

import asyncio

import torch

from client.routing import Hop
from swarm.errors import PeerError, PeerRefused, ProtocolError
from swarm.protocol import (
    INFERENCE_HANDLER,
    PROTOCOL_MINOR,
    WIRE_DTYPES,
    pack_tensor,
    read_message,
    require,
    unpack_tensor,
    write_message,
)

REPLY_MAX_BYTES = 1 << 30


class SpanStream:
    """One open inference stream to one peer for blocks [hop.span.start, hop.span.end)."""

    def __init__(self, hop: Hop, reader, writer, dtype: torch.dtype, config):
        self.hop = hop
        self.reader, self.writer = reader, writer
        self.dtype = dtype
        self.config = config
        self.steps = 0
        self.drain_deadline: float | None = None  # set when the peer says in-band that it is leaving

    @classmethod
    async def open(cls, transport, hop: Hop, addrs, model_id: str, batch_size: int, max_length: int, config):
        reader, writer = await transport.open_stream(hop.peer_id, addrs, INFERENCE_HANDLER, config.connect_timeout_s)
        try:
            await write_message(writer, {
                "type": "open", "minor": PROTOCOL_MINOR, "model_id": model_id,
                "blocks": [hop.span.start, hop.span.end], "batch_size": batch_size, "max_length": max_length,
            })
            reply = await cls._reply(reader, hop, config.connect_timeout_s)
            dtype = reply.get("dtype")
            if reply.get("type") != "opened" or dtype not in WIRE_DTYPES:
                raise PeerError(f"bad answer to open: type {reply.get('type')!r}, dtype {dtype!r}", peer=hop.peer_id)
        except BaseException:
            writer.close()
            raise
        return cls(hop, reader, writer, WIRE_DTYPES[dtype], config)

    @staticmethod
    async def _reply(reader, hop: Hop, timeout_s: float) -> dict:
        try:
            reply = await asyncio.wait_for(read_message(reader, REPLY_MAX_BYTES), timeout=timeout_s)
        except TimeoutError:
            raise PeerError(f"no reply within {timeout_s} s", peer=hop.peer_id) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerError(f"stream closed: {e!r}", peer=hop.peer_id) from None
        except ProtocolError as e:
            raise PeerError(f"malformed reply: {e}", peer=hop.peer_id) from None
        if reply.get("type") == "error":
            text = f"peer error ({reply.get('code')}): {reply.get('message')}"
            raise PeerRefused(text, peer=hop.peer_id)
        return reply

    async def step(self, hidden, position_ids, valid, position: int) -> torch.Tensor:
        """Send one step; return the peer's output hidden states ([batch, new, hidden], our dtype)."""
        await write_message(self.writer, {
            "type": "step", "minor": PROTOCOL_MINOR, "step": self.steps, "position": position,
            "hidden": pack_tensor(hidden.to(self.dtype)), "position_ids": pack_tensor(position_ids),
            "valid": pack_tensor(valid),
        })
        tokens = hidden.shape[0] * hidden.shape[1]
        timeout_s = self.config.step_timeout_s + tokens * self.config.step_timeout_per_token_s
        reply = await self._reply(self.reader, self.hop, timeout_s)
        try:
            out = unpack_tensor(reply.get("hidden"), "hidden", rank=3)
            deadline = reply.get("drain_deadline")
            if deadline is not None:
                self.drain_deadline = float(require(deadline, float, "drain_deadline"))
        except ProtocolError as e:
            raise PeerError(f"malformed result: {e}", peer=self.hop.peer_id) from None
        if out.dtype != self.dtype or out.shape != hidden.shape or not torch.isfinite(out).all():
            raise PeerError(f"result of shape {list(out.shape)} (expected {list(hidden.shape)}) or not finite",
                            peer=self.hop.peer_id)
        self.steps += 1
        return out

    async def close(self) -> None:
        """Say goodbye if the stream still works; never waits more than a second (a hung peer)."""
        try:
            await asyncio.wait_for(write_message(self.writer, {"type": "close"}), timeout=1)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.writer.close()
