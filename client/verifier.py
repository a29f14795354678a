"""Verification of peers' results, the imperative half: shadow routes, checks, convictions and repair.

One `Verifier` per InferenceSession (client.verify says when a check runs, how outputs are judged and
the bound on how long a liar lasts). The session calls it at four points:

  record(hop, ...)    after each hop's result: keeps the output until a check covers it, draws a check
  step(embeds, valid) in place of the session's step: applies a pending repair first, answers replayed
                      positions from the call's Trail, runs the rest live and records it
  rolled_back(pos)    after a rollback; replaced(old, new) after a failover swapped a hop
  settle()            before a generate call returns: every hop's unchecked outputs are checked

A check of hop h runs as a task beside the steps that follow (off the critical path). It feeds h's kept
inputs, from where its shadow route stands, through the shadow (another route for h's blocks, around h's
peer; opened on demand, kept for later checks) and compares the outputs from h's last agreeing check on.
On a disagreement a referee route (around both) is fed from position 0; the side the other two outvote
is convicted (a single peer only; see client.verify). A convicted primary leaves a `Repair`: at the
session's next step (or in settle) everything from its first wrong position m on is cut, its hop is
rebuilt on an honest route from the kept inputs before m, and, when the caller already holds tokens
after m, the call is rewound (`Rewound`): DistributedModelForCausalLM restarts it with the RNG state it
started with, and the Trail answers every position before m without the network, so the output is what
an honest route gives.

Positions a hop got by a push from the previous peer (server-to-server) ran on the pushed copy, which
the client never sees: a liar could push one thing and reply another, and its honest successor would
then disagree with the client's copy. A disagreement there convicts nobody: the session stops pushing
and replays from there, so the next check sees inputs the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import torch

from client import loop
from client.hopcheck import HopCheck, Repair, Shadow
from client.swarmview import peer_records
from client.verify import (
    Conviction,
    Rewound,
    Trail,
    dtype_bits,
    evidence_digest,
    first_mismatch,
    restore_rng,
    rng_state,
    token_errors,
    wants_check,
)
from swarm.errors import MissingBlocksError, PeerError, SessionError

logger = logging.getLogger(__name__)

_CHECK_ERRORS = (PeerError, ConnectionError, TimeoutError, SessionError, MissingBlocksError)
# a hop whose check found no second peer (or whose shadow failed) is not tried again for this long: a swarm
# with one peer per span would otherwise read the DHT on every step, looking for one
RETRY_CHECK_S = 10.0
_LOOP_THREAD = "swarm-client-loop"  # the name client.loop gives its thread


class Verifier:
    """Checks one session's hops (module docstring). Lives on the client loop, except the sync entry
    points `step` and `settle`, which the caller's thread runs (they drive the loop through client.loop)."""

    def __init__(self, session):
        self.session = session
        self.model = session.model
        config = session.model.client_config
        self.config = config
        self.probability = config.verify_probability
        self.tolerances = config.verify_tolerances
        self.rng = self.model.verify_rng
        self.trust = self.model.trust
        self.stats = self.model.verify_stats
        self.checks: dict[int, HopCheck] = {}  # id(HopState) -> its check
        self.trail: Trail | None = None
        self.repair: Repair | None = None
        self.push_off = False
        self._bits: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ the session's hooks

    def record(self, hop, position: int, out: torch.Tensor, valid: torch.Tensor, pushed: bool) -> None:
        """Hop `hop` returned `out` for positions [position, position + n) (inputs pushed to it or not)."""
        check = self.checks.get(id(hop))
        if check is None:
            check = self.checks[id(hop)] = HopCheck(hop, position)
        check.outputs.append((position, out, valid, pushed))
        self.stats.peer_steps[hop.peer_id] += 1
        if wants_check(hop.peer_id in self.trust.verified, self.probability, self.rng):
            self._launch(check)

    def rolled_back(self, position: int) -> None:
        _on_loop(self._truncate, position)

    def _truncate(self, position: int) -> None:
        for check in self.checks.values():
            check.truncate(position)
        if self.trail is not None:
            self.trail.truncate(position)

    def replaced(self, old, new_hops) -> None:
        """A failover (or a repair) swapped hop `old` for `new_hops`; theirs start at their first step."""
        check = self.checks.pop(id(old), None)
        if check is not None:
            self._drop(check)

    @property
    def trail_ahead(self) -> int:
        return self.trail.ahead if self.trail is not None else 0

    def begin_call(self) -> None:
        """A generate call starts at the session's position: its trail starts there."""
        self.trail = Trail(self.session.position)

    def end_call(self) -> None:
        self.trail = None

    def step(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The session's step with checks: repair first, replay from the trail, the rest live."""
        self._apply_repair()
        s = self.session
        valid = valid.to(torch.bool).cpu()
        served = None
        if self.trail is not None and self.trail.ahead:
            n, served = self.trail.serve(embeds, valid)
            if n:
                s.position += n
                s.row_tokens = s.row_tokens + valid[:, :n].sum(-1)
                embeds, valid = embeds[:, n:], valid[:, n:]
                served = served.to(embeds.device, embeds.dtype)
            if self.trail.ahead and embeds.shape[1]:  # the caller diverged from the trail: peers drop it
                self._cut_ahead(s.position)
            if not embeds.shape[1]:
                return served
        out = s.live_step(embeds, valid)
        if self.trail is not None:
            self.trail.record(embeds, valid, out)
        return out if served is None else torch.cat([served, out], dim=1)

    def settle(self) -> None:
        """Check every hop's outputs not checked yet and wait for all checks; then apply what they found
        (raises Rewound if the caller's tokens must be fed again)."""
        loop.run(self._settle(self.config.verify_settle_timeout_s), timeout_s=None)
        self._apply_repair()

    def close(self) -> None:
        _on_loop(self._close)

    def _close(self) -> None:
        for check in self.checks.values():
            self._drop(check)
        self.checks.clear()

    # ------------------------------------------------------------ checks

    def _launch(self, check: HopCheck) -> None:
        if time.monotonic() < check.retry_at or check.hop.peer_id in self.trust.convicted:
            return  # no peer to check against lately; or convicted already, its hop is being rebuilt
        if check.task is not None:
            check.wanted = True
            return
        check.wanted, check.cut = False, None
        steps = self.stats.peer_steps[check.hop.peer_id]
        check.task = asyncio.get_running_loop().create_task(self._check(check, steps))

    async def _settle(self, timeout_s: float) -> None:
        """Wait for the running checks, start one for every hop with outputs left unchecked, wait for those;
        all within `timeout_s` (a shadow on a hung peer must not hold the call for its step timeout: checks
        still running then go on, and what they find applies at the session's next step)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        for final in (False, True):  # checks running now, then one more for whatever they left unchecked
            running = [c.task for c in self.checks.values() if c.task is not None]
            left = deadline - asyncio.get_running_loop().time()
            if running:
                _, pending = await asyncio.wait(running, timeout=max(0.0, left))
                if pending:
                    logger.info("%d check(s) still running after %.1f s; the call returns without them",
                                len(pending), timeout_s)
                    return
            if final:
                return
            for check in list(self.checks.values()):
                if check.end > check.verified_upto and check.task is None:
                    self._launch(check)

    async def _check(self, check: HopCheck, drawn_at_steps: int) -> None:
        try:
            await self._run_check(check, drawn_at_steps)
        except asyncio.CancelledError:
            raise
        except Exception:  # a check must never take the session down; the next one tries again
            logger.exception("checking hop %s failed", check.hop.peer_id[-6:])
        finally:
            check.task = None
            if check.wanted and id(check.hop) in self.checks:
                self._launch(check)

    async def _run_check(self, check: HopCheck, drawn_at_steps: int) -> None:
        hop, first, end = check.hop, check.verified_upto, check.end
        mine = check.joined(first, end)
        kept = hop.kept()
        if mine is None or kept is None or end <= first or kept[0].shape[1] < end:
            return
        out, valid, pushed = mine
        try:
            if check.shadow is None:
                check.shadow = await self._open_shadow(hop, {hop.peer_id})
            theirs = await check.shadow.outputs(kept, first, end)
        except _CHECK_ERRORS as e:
            self.stats.unverifiable += 1
            check.retry_at = time.monotonic() + RETRY_CHECK_S
            if isinstance(e, MissingBlocksError):  # nobody else serves these blocks: this cannot be checked,
                check.accept(end)  # nor is it kept (a peer that comes later checks what comes later)
            logger.info("no check of %s [%s] now: %s", hop.peer_id[-6:], hop.span, e)
            await self._close_shadow(check)
            return
        self.stats.checks += 1
        self.stats.compared_tokens += end - first
        tolerance = self._tolerance([hop.peer_id, *check.shadow.peers], [hop, *check.shadow.hops])
        bad = first_mismatch(out, theirs, valid, tolerance)
        if bad is None:
            self._agreed(check, out, theirs, valid, end)
            return
        self.stats.mismatches += 1
        logger.warning("hop %s [%s] and its shadow %s disagree from position %d (error %.3g > %.3g)",
                       hop.peer_id[-6:], hop.span, "+".join(p[-6:] for p in check.shadow.peers), first + bad,
                       float(token_errors(out, theirs, valid)[bad]), tolerance)
        await self._referee(check, kept, first, end, out, theirs, valid, pushed, drawn_at_steps)

    def _agreed(self, check: HopCheck, out, theirs, valid, end: int) -> None:
        self.stats.agreed += 1
        error = float(token_errors(out, theirs, valid).max()) if out.shape[1] else 0.0
        self.stats.max_agreeing_error = max(self.stats.max_agreeing_error, error)
        check.accept(end)
        self.trust.verified.add(check.hop.peer_id)

    async def _referee(self, check, kept, first, end, out, theirs, valid, pushed, drawn_at_steps) -> None:
        hop, shadow = check.hop, check.shadow
        try:
            referee = await self._open_shadow(hop, {hop.peer_id, *shadow.peers})
            ref = await referee.outputs(kept, first, end)
        except _CHECK_ERRORS as e:
            self.stats.inconclusive += 1
            logger.warning("no referee for blocks %s (%s): cannot tell which of %s and %s is wrong", hop.span,
                           e, hop.peer_id[-6:], "+".join(p[-6:] for p in shadow.peers))
            await self._close_shadow(check)  # the next check asks another shadow, if any
            return
        tol_primary = self._tolerance([hop.peer_id, *referee.peers], [hop, *referee.hops])
        tol_shadow = self._tolerance([*shadow.peers, *referee.peers], [*shadow.hops, *referee.hops])
        primary_bad = first_mismatch(out, ref, valid, tol_primary)
        shadow_bad = first_mismatch(theirs, ref, valid, tol_shadow)
        if primary_bad is not None and shadow_bad is None:
            await referee.close()
            self._primary_outvoted(check, kept, first, end, out, ref, valid, pushed, primary_bad,
                                   [*shadow.peers, *referee.peers], drawn_at_steps)
        elif primary_bad is None and shadow_bad is not None:
            outvoted = shadow
            check.shadow = referee  # it holds every position up to `end`: the shadow of later checks
            await outvoted.close()
            self._agreed(check, out, ref, valid, end)
            self._shadow_outvoted(outvoted, hop, kept, first, end, theirs, ref, valid, shadow_bad,
                                  [hop.peer_id, *referee.peers])
        elif primary_bad is None:  # within tolerance of the referee both: a borderline pair, no one lied
            await referee.close()
            self._agreed(check, out, ref, valid, end)
        else:
            self.stats.inconclusive += 1
            logger.warning("blocks %s: primary %s, shadow and referee give three different answers", hop.span,
                           hop.peer_id[-6:])
            await referee.close()
            await self._close_shadow(check)

    def _primary_outvoted(self, check, kept, first, end, out, ref, valid, pushed, bad, witnesses,
                          drawn_at_steps):
        hop = check.hop
        position = first + bad
        if bool(pushed[bad]):
            self.stats.ambiguous += 1
            logger.warning("hop %s [%s] ran a pushed copy of its input at position %d: no conviction; pushes "
                           "off, replaying from there", hop.peer_id[-6:], hop.span, position)
            self._want_repair(Repair(position, push_off=True))
            return
        conviction = self._convict(hop.peer_id, hop.span, kept[0][:, first:end], first, position, out, ref,
                                   valid, bad, witnesses)
        self.stats.caught_at.setdefault(hop.peer_id, drawn_at_steps)
        if conviction is not None:
            self._want_repair(Repair(position, {hop.peer_id}))

    def _shadow_outvoted(self, outvoted: Shadow, hop, kept, first, end, theirs, ref, valid, bad, witnesses):
        for peer in outvoted.peers:
            self.trust.verified.discard(peer)
        if len(outvoted.hops) != 1:
            logger.warning("shadow route %s for blocks %s was outvoted; no single peer to blame",
                           "+".join(p[-6:] for p in outvoted.peers), hop.span)
            return
        peer = outvoted.peers[0]
        if self._convict(peer, hop.span, kept[0][:, first:end], first, first + bad, theirs, ref, valid, bad,
                         witnesses) is None:
            return
        for other in self.checks.values():  # what it served this session as a primary is suspect too
            if other.hop.peer_id == peer:
                self._want_repair(Repair(other.verified_upto, {peer}))

    def _convict(self, peer, span, inputs, first, position, wrong, right, valid, bad, witnesses):
        at = slice(bad, bad + 1)
        error = float(token_errors(wrong[:, at], right[:, at], valid[:, at])[0])
        model_id = self.model.model_id
        conviction = Conviction(
            peer_id=peer, model_id=model_id, start=span.start, end=span.end, position=position,
            rel_error=error, witnesses=tuple(w for w in dict.fromkeys(witnesses) if w != peer)[:4],
            evidence=evidence_digest(model_id, span.start, span.end, first, inputs, wrong, right),
            at=time.time(),
        )
        if not self.trust.convict(conviction):
            return None
        self.stats.convicted.append(conviction)
        logger.warning("peer %s returned wrong results for blocks %s from position %d (error %.3g); "
                       "outvoted by %s; banned by this client", peer, span, position, error,
                       ", ".join(w[-6:] for w in conviction.witnesses))
        if self.config.report_wrong_results:
            self._spawn(self._report(conviction))
        return conviction

    def _take_repair(self) -> Repair | None:
        repair, self.repair = self.repair, None
        return repair

    def _want_repair(self, repair: Repair) -> None:
        if self.repair is None:
            self.repair = repair
        else:
            self.repair.merge(repair)

    # ------------------------------------------------------------ repair

    def _apply_repair(self) -> None:
        """Cut the session back to the first wrong position, rebuild the convicted hops, and rewind the
        caller if it holds tokens past that position (raises Rewound)."""
        repair = _on_loop(self._take_repair)
        if repair is None:
            return
        s = self.session
        caller = s.position  # what the caller holds now
        position = min(repair.position, caller + self.trail_ahead)
        if repair.push_off:
            self.push_off = True
        if position <= caller:
            s.rollback(position)
        else:
            self._cut_ahead(position)
        loop.run(self._rebuild(repair.peers), timeout_s=None)
        if position >= caller:
            return
        self.stats.rewinds += 1
        if self.trail is not None and self.trail.start <= position:
            s.row_tokens = s.row_tokens - self.trail.rewind()
            s.position = self.trail.start
        raise Rewound(position, s.position, repair.peers)

    def _cut_ahead(self, position: int) -> None:
        """Peers, kept inputs and local caches go back to `position`, which lies ahead of the caller's
        (in the trail): the caller's own position and row tokens stay."""
        s = self.session
        for hop in s.hops:
            hop.truncate(position)
        for cache in s.local_caches:
            if cache is not None and cache.length > position:
                cache.truncate(position)
        _on_loop(self._truncate, position)
        loop.run(s._send_rollbacks(position), timeout_s=None)

    async def _rebuild(self, peers: set[str]) -> None:
        s = self.session
        for hop in [h for h in s.hops if h.peer_id in peers]:
            await s._replace(s.hops.index(hop), "returned wrong results")

    # ------------------------------------------------------------ shadows, tolerance, reports

    async def _open_shadow(self, hop, exclude: set[str]) -> Shadow:
        """A route for hop's blocks around `exclude` (and everyone convicted); MissingBlocksError if none."""
        s = self.session
        route, addrs = await s._plan(hop.span.start, hop.span.end, wait=False, exclude=exclude, refresh=False)
        return Shadow(await s._open(route, addrs), self.config.replay_chunk_tokens)

    async def _close_shadow(self, check: HopCheck) -> None:
        shadow, check.shadow = check.shadow, None
        if shadow is not None:
            await shadow.close()

    def _tolerance(self, peers: list[str], hops) -> float:
        snapshot = self.model.snapshots.get()
        if snapshot:
            self._bits.update({p: r.precision_bits for p, r in peer_records(snapshot).items()})
        bits = [min(self._bits.get(peer, 32), dtype_bits(hop.stream.dtype))
                for peer, hop in zip(peers, hops, strict=True)]
        return self.tolerances.for_bits(min(bits))

    async def _report(self, conviction: Conviction) -> None:
        """Publish a signed report (swarm.records.ReportRecord) within the limiter's allowance."""
        from swarm import records  # the record type; the transport signs with this client's identity

        transport = await self.model.transport()
        identity, dht = getattr(transport, "identity", None), getattr(transport, "dht", None)
        if identity is None or dht is None:
            logger.info("this transport cannot publish reports; %s is banned here only", conviction.peer_id)
            return
        if not self.model.report_limiter.allow(conviction.peer_id):
            logger.info("report on %s not sent: over this client's report allowance", conviction.peer_id)
            return
        report = records.ReportRecord(
            model_id=conviction.model_id, accused=conviction.peer_id, start=conviction.start,
            end=conviction.end,
            reporter=identity.peer_id.to_base58(), time=conviction.at, evidence=conviction.evidence,
            position=conviction.position, rel_error=min(conviction.rel_error, 1e30),
            witnesses=conviction.witnesses,
        )
        try:
            stored = await records.announce_report(dht, identity, report)
        except Exception as e:  # the transport shut down meanwhile, the DHT failed: the ban here stands
            logger.info("report on %s not stored: %r", conviction.peer_id, e)
            return
        if stored:
            self.stats.reports += 1
        else:
            logger.info("report on %s not confirmed by the DHT", conviction.peer_id)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop(self, check: HopCheck) -> None:
        """Forget a check: cancel its task, close its shadow (in the background: a hung peer holds no one)."""
        shadow, check.shadow = check.shadow, None
        task, check.task = check.task, None

        async def stop() -> None:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if shadow is not None:
                await shadow.close()

        with contextlib.suppress(RuntimeError):  # no client loop at interpreter exit
            asyncio.run_coroutine_threadsafe(stop(), loop.get_loop())


def _on_loop(fn, *args):
    """fn(*args) on the client loop's thread (where the checks mutate the same state), waiting for it."""
    if threading.current_thread().name == _LOOP_THREAD:
        return fn(*args)

    async def call():
        return fn(*args)

    return loop.run(call(), timeout_s=None)


def run_verified(session, attempt):
    """Run `attempt()` (one generate call, or a one-shot forward) so that what it returns is checked: its
    steps form a Trail, every hop's outputs are checked before it returns, and when a check finds a peer
    wrong the call runs again from its start with the RNG state it began with (the Trail answers the
    verified positions; only the ones from the first wrong position on go to the swarm again). Gives up
    with SessionError after ClientConfig.verify_max_rewinds rewinds."""
    verifier = session.verifier
    if verifier is None:
        return attempt()
    state = rng_state()
    verifier.begin_call()
    limit = session.model.client_config.verify_max_rewinds
    try:
        for _ in range(limit + 1):
            try:
                result = attempt()
                verifier.settle()
                return result
            except Rewound as e:
                logger.info("%s; running the call again", e)
                restore_rng(state)
        raise SessionError(f"peers were caught returning wrong results {limit + 1} times in one call; "
                           "giving up (raise verify_max_rewinds, or block them with blocked_peers)")
    finally:
        verifier.end_call()
