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

import torch

from client import loop
from client.policies import blame
from client.routing import Hop, plan_route
from client.stream import SpanStream
from client.swarmview import candidate, peer_records
from client.verifier import Verifier
from swarm.errors import MissingBlocksError, PeerError, PeerFull, PeerRefused, SessionError
from swarm.spans import Span

logger = logging.getLogger(__name__)


class HopState:
    """One hop of the route: its open stream and every input it was fed (what recovery replays).

    inputs: (hidden [batch, new, hidden] as sent, position_ids [batch, new], valid [batch, new]) per step.
    """

    def __init__(self, stream: SpanStream):
        self.stream = stream
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def span(self) -> Span:
        return self.stream.hop.span

    @property
    def peer_id(self) -> str:
        return self.stream.hop.peer_id

    def keep(self, hidden: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.inputs.append((hidden.to(self.stream.dtype), position_ids, valid))

    @property
    def kept_bytes(self) -> int:
        return sum(sum(t.numel() * t.element_size() for t in step) for step in self.inputs)

    def truncate(self, length: int) -> None:
        """Keep the inputs of the first `length` positions only (what a rollback leaves the peer holding)."""
        kept, at = [], 0
        for step in self.inputs:
            new = step[0].shape[1]
            if at + new > length:
                if length > at:
                    kept.append(tuple(t[:, : length - at] for t in step))
                break
            kept.append(step)
            at += new
        self.inputs = kept

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """All kept inputs joined along the token axis, or None before the first step."""
        if not self.inputs:
            return None
        return tuple(torch.cat([step[k] for step in self.inputs], dim=1) for k in range(3))


class InferenceSession:
    """A multi-step conversation through the swarm. Use as a context manager; not thread-safe.

    Failover: when a hop fails (stream closed, step timeout, error reply) or its peer announces in-band
    that it is draining, the hop's blocks are routed again around the banned peer (one or several new
    spans), the new spans are fed the hop's kept inputs so their caches hold exactly the same positions,
    and the step goes on. Kept inputs cost, per hop, batch x tokens x hidden_size x (wire dtype bytes);
    `ClientConfig.max_kept_bytes` bounds the whole session up front.

    Checks (ClientConfig.verify_probability > 0): `self.verifier` (client.verifier) sees every hop's result,
    runs checks of it on other peers beside the steps, and after a conviction cuts the session back to the
    first wrong position and rebuilds the liar's hop from the kept inputs before it.
    """

    def __init__(self, model, max_length: int):
        self.model = model
        self.max_length = max_length
        self.position = 0
        self.row_tokens: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.call_start = 0
        self.hops: list[HopState] = []
        self.recoveries = 0  # hops replaced so far (failures and drains), for logs and tests
        self.local_caches: list = [None, None]  # of the blocks run here (model.local_spans), made on first use
        self.closed = False
        # checks of the peers' results (client.verifier); None with ClientConfig.verify_probability = 0
        self.verifier = Verifier(self) if model.client_config.verify_probability > 0 else None

    @property
    def route(self) -> list[Hop]:
        return [h.stream.hop for h in self.hops]

    @property
    def kept_bytes(self) -> int:
        return sum(h.kept_bytes for h in self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run new tokens' embeddings through every span; returns the last span's hidden states. With
        checks on, a pending repair comes first and replayed positions come from the call's trail
        (client.verifier)."""
        if self.verifier is not None and not self.closed:
            return self.verifier.step(embeds, valid)
        return self.live_step(embeds, valid)

    def live_step(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`step` through the peers, without the verifier's part."""
        if self.closed:
            raise SessionError("this inference session is closed")
        batch, new, hidden_size = embeds.shape
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
        first, last = self.model.local_spans
        try:
            hidden = self._run_local(0, first, embeds.detach(), position_ids, valid)
            out = loop.run(self._step(hidden.cpu(), position_ids, valid), timeout_s=None)
            out = self._run_local(1, last, out, position_ids, valid)
        except BaseException:  # the step did not happen: local caches forget it too (peers never held it)
            for cache in self.local_caches:
                if cache is not None and cache.length > self.position:
                    cache.truncate(self.position)
            raise
        self.position += new
        self.row_tokens += valid.sum(-1)
        return out.to(embeds.device, embeds.dtype)

    def rollback(self, position: int) -> None:
        """Go back to holding the first `position` positions on every span (speculative decoding drops the
        draft tokens the model rejected). Kept inputs are cut to match, so a failover replays exactly the
        positions that remain; each peer's rollback is sent now and confirmed with the next step (no round
        trip of its own); a peer that cannot take it is routed around then, like any failed hop."""
        if self.closed:
            raise SessionError("this inference session is closed")
        if not 0 <= position <= self.position:
            raise SessionError(f"cannot roll back to position {position}: the session holds {self.position}")
        ahead = self.verifier.trail_ahead if self.verifier is not None else 0  # held past position (a replay)
        if position == self.position and not ahead:
            return
        dropped = None  # valid [batch, dropped]; from the masks alone (joining the hidden states costs)
        if self.hops:
            dropped = torch.cat([step[2] for step in self.hops[0].inputs], dim=1)[:, position : self.position]
        for hop in self.hops:
            hop.truncate(position)
        for cache in self.local_caches:
            if cache is not None:
                cache.truncate(position)
        if dropped is not None:
            self.row_tokens = self.row_tokens - dropped.sum(-1)
        self.position = position
        if self.verifier is not None:
            self.verifier.rolled_back(position)
        loop.run(self._send_rollbacks(position), timeout_s=None)

    async def _send_rollbacks(self, position: int) -> None:
        for hop in list(self.hops):  # a replacement (rebuilt from the cut inputs) needs no rollback
            try:
                await asyncio.wait_for(hop.stream.rollback(position), self.model.client_config.step_timeout_s)
            except (ConnectionError, TimeoutError, RuntimeError) as e:  # a broken stream: rebuilt right away
                self._ban_for(hop.peer_id, e)
                logger.warning("hop %s [%s] failed its rollback: %r", hop.peer_id[-6:], hop.span, e)
                await self._replace(self.hops.index(hop), f"failed: {e!r}")

    def _run_local(self, which: int, span, hidden: torch.Tensor, position_ids, valid) -> torch.Tensor:
        """Blocks this client runs itself (model.local_spans[which], None: none), on its own cache."""
        if span is None:
            return hidden
        if self.local_caches[which] is None:
            self.local_caches[which] = span.new_cache(hidden.shape[0], self.max_length)
        device = span.device
        with torch.inference_mode():
            return span(hidden.to(device, span.dtype), position_ids.to(device), valid.to(device),
                        self.local_caches[which])

    def _check_memory(self, batch: int, hidden_size: int) -> None:
        """Refuse up front a session whose kept inputs could exceed max_kept_bytes (float32, every hop full)."""
        worst = self.max_length * batch * hidden_size * 4 * max(1, len(self.hops))
        limit = self.model.client_config.max_kept_bytes
        if worst > limit:
            raise SessionError(
                f"a session of {self.max_length} tokens x batch {batch} over {len(self.hops)} hops would keep up "
                f"to {worst} bytes of inputs for recovery, above max_kept_bytes={limit}; "
                "shorten the session or raise the limit"
            )

    async def _step(self, hidden, position_ids, valid):
        if not self.hops:
            self.hops = await self._build(self.model.remote.start, self.model.remote.end, None)
            self._check_memory(hidden.shape[0], hidden.shape[2])
        chunk = self.model.client_config.pipeline_chunk_tokens
        if chunk > 0 and hidden.shape[1] > chunk and len(self.hops) > 1:
            out = await self._pipelined(hidden, position_ids, valid, chunk)
        else:
            out = await self._through_hops(hidden, position_ids, valid, self.position)
        for i in reversed(range(len(self.hops))):  # at the step boundary: leave peers that are draining
            if self.hops[i].stream.drain_deadline is not None:
                await self._replace(i, "draining")
        return out

    async def _through_hops(self, hidden, position_ids, valid, at: int, sent=None):
        """One step at position `at` through every hop in turn; a failed hop is routed again, fed its kept
        inputs, and the step goes on on its replacement(s). Returns the last hop's output.

        `sent` (the pipeline's, see `_pipelined`): (stream, written, push route, planned streams) of a step
        already sent to the first hop: its result is read once `written` is done, and the pushes that
        step planned count only for the hops of that moment (`planned`)."""
        i = 0
        asked = forwarded = False  # whether the previous hop was asked to push hop i's input, and did
        planned_chain = False  # the pushes reaching hop i are those planned in `sent`
        while i < len(self.hops):
            hop = self.hops[i]
            push = self._push_route(i + 1, at)
            try:
                if i == 0 and sent is not None and hop.stream is sent[0]:
                    await sent[1]
                    out = await hop.stream.result(hidden, at)
                    push, planned_chain = sent[2], True
                elif forwarded:
                    out = await hop.stream.forwarded_step(hidden, position_ids, valid, at, push)
                else:  # "fallback": a push that reported failure (or a failed hop's push) may still land
                    out = await hop.stream.step(hidden, position_ids, valid, at, push, fallback=asked)
                    planned_chain = False
            except (PeerError, ConnectionError, TimeoutError) as e:
                self._ban_for(hop.peer_id, e)
                logger.warning("hop %s [%s] failed: %s", hop.peer_id[-6:], hop.span, e)
                await self._replace(i, f"failed: {e}")
                forwarded = False  # the replacement hop(s) get the step from us
                continue  # the same step, now on the replacement hop(s)
            hop.keep(hidden, position_ids, valid)
            if self.verifier is not None:
                self.verifier.record(hop, at, out, valid, pushed=forwarded)
            self.model.bans.clear(hop.peer_id)
            asked = bool(push)
            # a push planned before a failover went to the hop of that moment, not to its replacement
            following = self.hops[i + 1].stream if i + 1 < len(self.hops) else None
            forwarded = asked and hop.stream.pushed and (not planned_chain or following in sent[3])
            hidden = out
            i += 1
        return hidden

    async def _pipelined(self, hidden, position_ids, valid, chunk: int):
        """One long step (a prompt) as consecutive steps of `chunk` tokens through the route: every part
        is sent to the first hop at once (a task of its own: the peer reads only a few messages ahead, and
        its results must be read meanwhile), each with its push route, so hop i runs part c + 1 while
        hop i + 1 runs part c. Results are then taken part by part with `_through_hops` (its failover
        included: a part's failed hop is routed again and fed the parts before). Returns the last hop's
        outputs, joined."""
        parts = [(hidden[:, o : o + chunk], position_ids[:, o : o + chunk], valid[:, o : o + chunk],
                  self.position + o) for o in range(0, hidden.shape[1], chunk)]
        first = self.hops[0].stream
        planned = {h.stream for h in self.hops}  # the streams the first sends' push routes name
        pushes = [self._push_route(1, at, ahead=c) for c, (_, _, _, at) in enumerate(parts)]
        written = [asyncio.get_running_loop().create_future() for _ in parts]

        async def send_all() -> None:
            for c, (h, p, v, at) in enumerate(parts):
                try:
                    await first.send(h, p, v, at, pushes[c], ahead=c)
                except (ConnectionError, RuntimeError) as e:  # the first hop's stream broke: failover
                    for future in written[c:]:
                        future.set_exception(ConnectionError(f"stream closed while sending a prompt: {e!r}"))
                    return
                written[c].set_result(True)

        sending = asyncio.create_task(send_all())
        outs = []
        try:
            for c, (h, p, v, at) in enumerate(parts):
                for hop in self.hops:
                    hop.stream.prefetch()
                sent = (first, written[c], pushes[c], planned)
                outs.append(await self._through_hops(h, p, v, at, sent=sent))
        finally:
            sending.cancel()
            for future in written:  # sends that failed after the loop stopped waiting on them
                if future.done() and not future.cancelled():
                    future.exception()
        return torch.cat(outs, dim=1)

    def _push_route(self, start: int, position: int | None = None, ahead: int = 0) -> list[dict]:
        """Push targets of hops[start:] for the step at `position` (default: the session's; `ahead`: steps
        of those hops before it whose results were not read yet), each token naming the hop before it as
        the pusher, up to the first hop that takes none; empty with server-to-server steps off."""
        pushes_off = self.verifier is not None and self.verifier.push_off  # a check wants our own copies
        if not self.model.client_config.server_to_server or pushes_off:
            return []
        position = self.position if position is None else position
        route = []
        for before, hop in zip(self.hops[start - 1 :], self.hops[start:], strict=False):
            target = hop.stream.push_target(before.peer_id, position, ahead)
            if target is None:
                break
            route.append(target)
        return route

    def _ban_for(self, suspect: str, error: BaseException) -> str | None:
        """Ban the peer `error` is blamed on (`suspect` unless the error names one); returns it, or None."""
        peer = blame(suspect, error)
        if peer:
            self.model.bans.ban(peer, str(error))
        return peer

    async def _replace(self, i: int, reason: str) -> None:
        """Route hop i's blocks again (around banned peers), replay its kept inputs, swap it out."""
        old = self.hops[i]
        if reason == "draining":
            self.model.bans.ban(old.peer_id, "draining")
        new = await self._build(old.span.start, old.span.end, old.kept())
        self.hops[i : i + 1] = new
        if self.verifier is not None:
            self.verifier.replaced(old, new)
        self.recoveries += 1
        logger.info("hop %s [%s] %s; replaced by %s", old.peer_id[-6:], old.span, reason,
                    ", ".join(f"{h.peer_id[-6:]} [{h.span}]" for h in new))
        asyncio.create_task(old.stream.close())  # a hung peer must not hold us up

    async def _build(self, start: int, end: int, kept) -> list[HopState]:
        """Open hops covering blocks [start, end) and feed them `kept` inputs; retried within the policy."""
        config = self.model.client_config
        retry = config.recovery_policy.start()
        refusals: dict[str, str] = {}
        while True:
            try:
                # once peers refused us (full, draining), blocks they alone serve are not missing: no waiting
                # for new peers to appear, the refusals are the answer
                route, addrs = await self._plan(start, end, wait=not refusals)
            except MissingBlocksError as e:
                if not refusals:
                    raise
                reasons = "; ".join(f"{peer[-6:]}: {reason}" for peer, reason in refusals.items())
                raise SessionError(f"no peer for blocks {e.missing} would take this session ({reasons})") from e
            hops: list[HopState] = []
            try:
                hops = await self._open(route, addrs)
                await self._replay(hops, kept)
                return hops
            except (PeerError, ConnectionError, TimeoutError) as e:
                peer = self._ban_for(getattr(e, "peer", None) or "", e)
                if peer and isinstance(e, PeerRefused):
                    refusals[peer] = str(e)
                for hop in hops:
                    asyncio.create_task(hop.stream.close())
                delay = retry.next_delay()
                if delay is None:
                    raise SessionError(
                        f"could not route blocks {start}:{end} after {retry.attempt} attempts "
                        f"in {retry.elapsed_s():.1f} s; last error: {e}"
                    ) from e
                logger.warning("routing blocks %d:%d failed (%s); retrying in %.2f s", start, end, e, delay)
                await asyncio.sleep(delay)

    async def _plan(self, start: int, end: int, wait: bool = True, exclude=(), refresh: bool = True):
        """A route for [start, end) from a fresh DHT snapshot; waits for missing blocks up to the deadline
        (`wait`), else raises MissingBlocksError once a fresh snapshot has none. Never through banned,
        blocked or convicted peers (client.verify), nor through `exclude` (a check's own peers).
        `refresh=False`: a cached snapshot without a route is the answer (a check looking for a second
        peer reads the DHT only once the cache is older than snapshot_max_age_s)."""
        model, config = self.model, self.model.client_config
        transport = await model.transport()
        retry = config.route_wait_policy.start()
        fresh = False
        while True:
            # recovery first tries the snapshot it already has (minus banned peers): no DHT round on the
            # critical path; a fresh one is fetched when that one has no route or is old
            snapshot = model.snapshots.get() if not fresh else None
            if snapshot is None:
                snapshot = await transport.fetch_blocks(model.model_id, model.num_blocks)
                model.snapshots.put(snapshot)
                fresh = True
            records = peer_records(snapshot)
            addrs = {peer: list(r.addrs) for peer, r in records.items()}
            banned = (model.bans.banned() | set(config.blocked_peers) | model.trust.convicted_peers()
                      | set(exclude))
            await model.latencies.measure(
                transport, {p: a for p, a in addrs.items() if p not in banned}, config.ping_timeout_s
            )
            latencies = model.latencies.known()
            candidates = [candidate(peer, r, latencies.get(peer)) for peer, r in records.items()]
            try:
                route = plan_route(
                    candidates, model.num_blocks, model_id=model.model_id, start_block=start, end_block=end,
                    banned=banned, need_cache_tokens=self.max_length, cost_model=config.route_cost_model,
                    min_precision_bits=config.min_precision_bits,
                )
                return route, addrs
            except MissingBlocksError:
                if not fresh and refresh:
                    fresh = True
                    continue
                delay = retry.next_delay() if wait else None
                if delay is None:
                    raise
                logger.debug("no route for %d:%d yet; snapshot %s", start, end,
                             {b: sorted(p[-6:] for p in v) for b, v in snapshot.items()})
                await asyncio.sleep(delay)

    async def _open(self, route: list[Hop], addrs) -> list[HopState]:
        """One open stream per hop of `route`, in route order.

        Every hop is opened at once, each peer asked not to wait for KV room. If some are full, waiting for
        them while holding the others' room could deadlock: two clients each holding the peer the other
        waits for (on a busy swarm every hop of a route may be full for somebody). So the rest is taken in
        one order every client shares, the peers' ids: the streams opened to peers below the first full
        one are kept, the others are closed, and the remaining hops are opened one by one in that order,
        each waiting its peer's admission time. A client then waits only while holding peers ordered
        before the one it waits for, so no cycle of waits can form."""
        model, config = self.model, self.model.client_config
        transport = await model.transport()
        batch = int(self.row_tokens.shape[0]) if self.row_tokens is not None else 1

        def open_hop(hop: Hop, wait_s: float | None):
            return SpanStream.open(transport, hop, addrs.get(hop.peer_id, []), model.model_id, batch,
                                   self.max_length, config, wait_s=wait_s)

        results = await asyncio.gather(*(open_hop(hop, 0.0) for hop in route), return_exceptions=True)
        opened = {i: r for i, r in enumerate(results) if isinstance(r, SpanStream)}
        full = [i for i, r in enumerate(results) if isinstance(r, PeerFull)]
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, PeerFull)]
        try:
            if errors:
                raise errors[0]
            if full:
                first_full = min(route[i].peer_id for i in full)
                for i in [i for i in opened if route[i].peer_id > first_full]:
                    asyncio.create_task(opened.pop(i).close())
                logger.info("%d of %d hops full; opening the rest in peer order", len(full), len(route))
                for i in sorted((i for i in range(len(route)) if i not in opened), key=lambda i: route[i].peer_id):
                    opened[i] = await open_hop(route[i], None)
        except BaseException:
            for stream in opened.values():
                asyncio.create_task(stream.close())
            raise
        logger.info("route: %s", " -> ".join(f"{h.peer_id[-6:]}[{h.span}]" for h in route))
        return [HopState(opened[i]) for i in range(len(route))]

    async def _replay(self, hops: list[HopState], kept) -> None:
        """Feed the kept inputs through the new hops in chunks, so each cache holds every past position."""
        if kept is None:
            return
        chunk = self.model.client_config.replay_chunk_tokens
        hidden, position_ids, valid = kept
        for hop in hops:
            outs = []
            for offset in range(0, hidden.shape[1], chunk):
                part = (hidden[:, offset : offset + chunk], position_ids[:, offset : offset + chunk],
                        valid[:, offset : offset + chunk])
                outs.append(await hop.stream.step(*part, offset))
                hop.keep(*part)
            hidden = torch.cat(outs, dim=1)

    async def _close_streams(self) -> None:
        await asyncio.gather(*(h.stream.close() for h in self.hops))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.verifier is not None:
            self.verifier.close()
        for cache in self.local_caches:
            if cache is not None:
                cache.free()
        if self.hops:
            try:
                loop.run(self._close_streams(), timeout_s=5)
            except Exception as e:  # closing is best effort: peers expire idle sessions themselves
                logger.debug("closing streams: %s", e)
        self.model._session_closed(self)
