"""Inference sessions: one stream per span of the route, driven step by step.

`InferenceSession` is what `model.inference_session(max_length=...)` returns. It owns the route, one
`SpanStream` per hop, and the bookkeeping that positions need across `generate` calls:

  position   cache slots already filled on every span (left padding included)
  row_tokens [batch] real tokens each row has fed, the source of rotary positions
  pending    tokens a finished `generate` returned but never fed (its last token), prepended next time

Shapes at the boundary: embeds [batch, new, hidden] and valid [batch, new] in; hidden [batch, new, hidden] out.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from swarm.errors import MissingBlocksError, PeerError, PeerRefused, ProtocolError, SessionError
from swarm.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_MINOR,
    pack_tensor,
    read_message,
    require,
    unpack_tensor,
    write_message,
)
from swarm.spans import Span

from client import loop
from client.routing import Candidate, Hop, plan_route

logger = logging.getLogger(__name__)

REPLY_MAX_BYTES = 1 << 30


class SpanStream:
    """One open inference stream to one peer for blocks [hop.span.start, hop.span.end)."""

    def __init__(self, hop: Hop, reader, writer, dtype: torch.dtype, timeout_s: float):
        self.hop = hop
        self.reader, self.writer = reader, writer
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.steps = 0

    @classmethod
    async def open(cls, transport, hop: Hop, addrs, model_id: str, batch_size: int, max_length: int, config):
        reader, writer = await transport.open_stream(hop.peer_id, addrs, INFERENCE_HANDLER, config.connect_timeout_s)
        try:
            await write_message(writer, {
                "type": "open", "minor": PROTOCOL_MINOR, "model_id": model_id,
                "blocks": [hop.span.start, hop.span.end], "batch_size": batch_size, "max_length": max_length,
            })
            reply = await cls._reply(reader, hop, config.connect_timeout_s)
            if reply.get("type") != "opened":
                raise ProtocolError(f"peer answered {reply.get('type')!r} to open")
            dtype = require(reply.get("dtype"), str, "dtype")
            from swarm.protocol import WIRE_DTYPES

            if dtype not in WIRE_DTYPES:
                raise ProtocolError(f"peer computes in unknown dtype {dtype!r}")
        except BaseException:
            writer.close()
            raise
        return cls(hop, reader, writer, WIRE_DTYPES[dtype], config.step_timeout_s)

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
        reply = await self._reply(self.reader, self.hop, self.timeout_s)
        try:
            out = unpack_tensor(reply.get("hidden"), "hidden", rank=3)
        except ProtocolError as e:
            raise PeerError(f"malformed result: {e}", peer=self.hop.peer_id) from None
        if out.shape != hidden.shape or not torch.isfinite(out).all():
            raise PeerError(f"result of shape {list(out.shape)} (expected {list(hidden.shape)}) or not finite",
                            peer=self.hop.peer_id)
        self.steps += 1
        return out

    async def close(self) -> None:
        try:
            await asyncio.wait_for(write_message(self.writer, {"type": "close"}), timeout=2)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.writer.close()


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


class InferenceSession:
    """A multi-step conversation through the swarm. Use as a context manager; not thread-safe."""

    def __init__(self, model, max_length: int):
        self.model = model
        self.max_length = max_length
        self.position = 0
        self.row_tokens: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.call_start = 0
        self.streams: list[SpanStream] = []
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self.streams]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run new tokens' embeddings through every span; returns the last span's hidden states."""
        if self.closed:
            raise SessionError("this inference session is closed")
        batch, new, _ = embeds.shape
        if self.position + new > self.max_length:
            raise SessionError(
                f"session max_length={self.max_length} reached ({self.position} + {new} tokens); "
                "open the session with a larger max_length"
            )
        if self.row_tokens is None:
            self.row_tokens = torch.zeros(batch, dtype=torch.long)
        elif batch != self.row_tokens.shape[0]:
            raise SessionError(f"batch size changed from {self.row_tokens.shape[0]} to {batch} within a session")
        valid = valid.to(torch.bool).cpu()
        position_ids = (self.row_tokens[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        out = loop.run(self._step(embeds.detach().cpu(), position_ids, valid), timeout_s=None)
        self.position += new
        self.row_tokens += valid.sum(-1)
        return out.to(embeds.device, embeds.dtype)

    async def _step(self, hidden, position_ids, valid):
        if not self.streams:
            await self._open_route(hidden.shape[0])
        for stream in self.streams:
            hidden = await stream.step(hidden, position_ids, valid, self.position)
        return hidden

    async def _open_route(self, batch_size: int) -> None:
        model, config = self.model, self.model.client_config
        transport = await model.transport()
        banned: set[str] = set(config.blocked_peers)
        deadline = time.monotonic() + config.wait_for_route_s
        for _ in range(config.max_open_attempts):
            route, addrs = await self._plan(transport, banned, deadline)
            try:
                self.streams = await self._open_streams(transport, route, addrs, batch_size)
                logger.info("route: %s", " -> ".join(f"{h.peer_id[-6:]}[{h.span}]" for h in route))
                return
            except (PeerError, ProtocolError) as e:
                logger.warning("could not open the route: %s", e)
                banned.update(getattr(e, "peer", None) and {e.peer} or set())
        raise SessionError(f"could not open a route after {config.max_open_attempts} attempts; see the log")

    async def _plan(self, transport, banned, deadline):
        model, config = self.model, self.model.client_config
        while True:
            snapshot = await transport.fetch_blocks(model.model_id, model.num_blocks)
            _, addrs = candidates_from_snapshot(snapshot)
            await model.latencies.measure(transport, addrs, config.ping_timeout_s)
            candidates, addrs = candidates_from_snapshot(snapshot, model.latencies.known())
            try:
                route = plan_route(candidates, model.num_blocks, model_id=model.model_id, banned=frozenset(banned),
                                   need_cache_tokens=self.max_length, cost_model=config.cost_model)
                return route, addrs
            except MissingBlocksError:
                logger.debug("no route yet; snapshot %s", {b: {k[-4:]: (r.state, r.start, r.end) for k, r in v.items()} for b, v in snapshot.items()})
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(config.route_poll_s)

    async def _open_streams(self, transport, route, addrs, batch_size) -> list[SpanStream]:
        model, config = self.model, self.model.client_config
        results = await asyncio.gather(*(
            SpanStream.open(transport, hop, addrs.get(hop.peer_id, []), model.model_id, batch_size,
                            self.max_length, config)
            for hop in route
        ), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(r.close() for r in results if isinstance(r, SpanStream)))
            raise errors[0]
        return list(results)

    async def _close_streams(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.streams:
            try:
                loop.run(self._close_streams(), timeout_s=5)
            except Exception as e:  # closing is best effort: peers expire idle sessions themselves
                logger.debug("closing streams: %s", e)
        self.model._session_closed(self)
