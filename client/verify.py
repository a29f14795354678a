"""Verification of peers' results, the pure half: tolerances, the check schedule and its bound, trust.

Any volunteer can join a public swarm, and one that returns wrong hidden states (a bug, a broken GPU, a
bad quantization, malice) would silently corrupt every generation routed through it. So the client
checks (client.verifier runs the checks; this module decides when and how to judge them):

* **When.** After each step of each hop, a check is drawn with probability p = ClientConfig.
  verify_probability (default 0.05), and always on the first step a peer serves this client before one
  of its checks agreed (`wants_check`). Before a `generate` call returns, every hop's outputs not yet
  checked are checked, so what a call returns has been checked in full whenever a second peer exists.
* **What.** A check of hop h compares *every* output of h since its last agreeing check, not only the
  step that drew it: a second peer serving h's blocks (a "shadow" route, opened on demand and fed h's kept
  inputs, so its cache holds the same positions) runs the same inputs, and the outputs are compared
  position by position within the tolerance below. Disagreement asks a third peer (a referee, fed from
  position 0); the one the other two outvote is convicted: banned by this client for good, reported
  (swarm.records.ReportRecord) and, if it was the primary, routed around, and the session is replayed
  from its first wrong position on an honest route (client.verifier).

Tolerance (`Tolerances`), on the relative L2 error of each token's hidden state, max over the batch,
||a - b|| / max(||a||, ||b||), at the lowest precision among the compared peers (their records' dtype,
weight_bits and kv_dtype: swarm.records.BlockRecord.precision_bits):

  float32 on both sides        1e-3   two honest float32 peers differ by summation order only (another
                                      batch composition, attention kernel, thread count): ~1e-6 after a
                                      span, so 1e-3 keeps a wide margin and still catches a 0.1 % error
  16-bit (bfloat16, float16)   5e-2   bfloat16 keeps 8 significant bits (rounding 2^-9 = 2e-3 per
                                      operation); two honest bf16 peers that round in another order drift
                                      to ~1e-2 over a span of blocks
  8-bit (int8/fp8 weights,     0.15   quantization itself moves a span's output by several percent
  fp8 KV cache)                       against full precision or another scheme
  4-bit (nf4)                  0.30   ~10-20 %

So against quantized spans a check catches gross errors only (garbage, wrong weights, a broken device),
not a subtle bias below the tolerance: no check can tell such a bias from honest quantization error.

The bound. Count the steps a lying peer serves this client as the primary of a hop. A lie at step s is
caught by the first check drawn at a step t >= s (that check covers every output since the last agreeing
one, s included); each step draws independently with probability p. Let G ~ Geometric(p) on {1, 2, ...}:
P(G > k) = (1 - p)^k.

  (a) honest for N steps (N >= 1; the forced first check finds nothing), then lying at every step: it is
      caught at step T = N + G, so P(T > N + k) = (1 - p)^k and E[T] = N + 1/p. Within N + k* steps with
      probability >= 1 - d for k* = ceil(ln d / ln(1 - p)): p = 0.05 gives k* = 59 at d = 0.05 and 90 at
      d = 0.01 (`steps_to_catch`).
  (b) lying at each step with probability q (independently): its first lie L ~ Geometric(q), T = L + G - 1,
          P(T > n) = (1-q)^n + q (1-p) [(1-p)^n - (1-q)^n] / (q - p)     (q != p)
          P(T > n) = (1-p)^n (1 + n p)                                   (q == p)
      and E[T] = 1/q + 1/p - 1 (`tail_bound`, `expected_steps`). Lying "only rarely" buys 1/q steps, no
      escape. The forced first check only shortens T (a lie at step 1 is caught at step 1), so both are
      upper bounds; the check before each `generate` returns caps T at the end of the call.
  (c) lying on one block of its span only: the same as (a) or (b), since the hop's output carries the
      block's error (unless it stays below the tolerance at the span's output).

The conviction itself comes when the check's answer does: checks run beside the steps that follow (the
step goes on with the primary's result), typically within a step or two, and before `generate` returns
at the latest. `simulate_catch` draws T with the very `wants_check` the client uses (tests and
benchmarks/bench_verify.py compare it with the bound over seeded trials).

What a check cannot do: catch lies below the tolerance; tell which of two disagreeing peers lies when no
third one serves the blocks (nobody is convicted, the step goes on; `VerifyStats.inconclusive`); resist
two colluding liars that answer alike (a majority of three); blame within a chain (a shadow or referee
made of several hops that gets outvoted is dropped, and its peers lose their verified standing, but no
one is convicted).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swarm.errors import ConfigError, SessionError

FULL_PRECISION_BITS = 32


# ---------------------------------------------------------------- tolerance


@dataclass(frozen=True)
class Tolerances:
    """Relative L2 error per token allowed between two peers' outputs, by the lower precision of the two."""

    float32: float = 1e-3
    half: float = 5e-2  # bfloat16 / float16
    int8: float = 0.15  # 8-bit weights (int8, fp8) or an fp8 KV cache
    int4: float = 0.30  # 4-bit weights (nf4)

    def __post_init__(self) -> None:
        for name in ("float32", "half", "int8", "int4"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"Tolerances.{name} = {value!r}: must be a finite number > 0")

    def for_bits(self, bits: int) -> float:
        """The tolerance of a comparison whose least precise side runs at `bits` bits."""
        if bits >= FULL_PRECISION_BITS:
            return self.float32
        if bits >= 16:
            return self.half
        return self.int8 if bits >= 8 else self.int4


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of a wire dtype (what a peer's outputs come in when its record is not at hand)."""
    return torch.finfo(dtype).bits if dtype.is_floating_point else FULL_PRECISION_BITS


def token_errors(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[n] the relative L2 error of each position's hidden state, max over the batch (0 where no row is
    valid). a, b: [batch, n, hidden]; valid: [batch, n]."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    errors = ((a - b).norm(dim=-1) / scale).masked_fill(~valid.bool().cpu(), 0.0)  # [batch, n]
    return errors.amax(dim=0) if errors.shape[0] else errors.new_zeros(errors.shape[1])


def first_mismatch(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, tolerance: float) -> int | None:
    """The index (along the token axis) of the first position where a and b differ beyond `tolerance`, or
    None if they agree everywhere. A non-finite value counts as a mismatch."""
    errors = token_errors(a, b, valid)
    bad = (errors > tolerance) | ~torch.isfinite(errors)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


# ---------------------------------------------------------------- schedule and bound


def wants_check(peer_verified: bool, probability: float, rng: random.Random) -> bool:
    """Whether this step of a hop is checked: always while its peer has no agreeing check yet, else with
    `probability`. The one draw of the schedule (client.verifier and simulate_catch both call it)."""
    return not peer_verified or rng.random() < probability


def tail_bound(p: float, q: float, n: int, honest_steps: int = 0) -> float:
    """P(a peer is still not caught after n of its steps): it lies with probability q per step after
    `honest_steps` honest ones, each step is checked with probability p (module docstring, (a) and (b))."""
    _check_probability("p", p)
    _check_probability("q", q)
    k = n - honest_steps
    if k <= 0:
        return 1.0
    if q == 0:
        return 1.0
    a, b = 1.0 - q, 1.0 - p
    if q == p:
        return b**k * (1.0 + k * p)
    return a**k + q * b * (b**k - a**k) / (q - p)


def expected_steps(p: float, q: float = 1.0, honest_steps: int = 0) -> float:
    """E[steps until caught] for the same peer as tail_bound: honest_steps + 1/q + 1/p - 1."""
    _check_probability("p", p)
    _check_probability("q", q)
    if p == 0 or q == 0:
        return math.inf
    return honest_steps + 1.0 / q + 1.0 / p - 1.0


def steps_to_catch(p: float, confidence: float = 0.99, q: float = 1.0, honest_steps: int = 0) -> int:
    """The fewest steps n with P(caught within n) >= confidence (tail_bound(n) <= 1 - confidence)."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence {confidence!r}: must be in (0, 1)")
    if p == 0 or q == 0:
        raise ConfigError("with p = 0 or q = 0 the peer is never caught")
    if q == 1:  # closed form of (a)
        if p == 1:
            return honest_steps + 1
        return honest_steps + math.ceil(math.log(1 - confidence) / math.log(1 - p))
    n = honest_steps + 1
    while tail_bound(p, q, n, honest_steps) > 1 - confidence:
        n += 1
    return n


def simulate_catch(p: float, q: float, honest_steps: int, rng: random.Random, *,
                   lie_rng: random.Random | None = None, max_steps: int = 1_000_000) -> int:
    """One trial: the step at which a check first covers a lie (module docstring), drawing checks with
    `wants_check` exactly as the client does (the first step always checked). `lie_rng` draws the lies
    (default: `rng`). Returns max_steps + 1 if never caught within max_steps."""
    lie_rng = lie_rng or rng
    verified, lied = False, False
    for step in range(1, max_steps + 1):
        lied = lied or (step > honest_steps and lie_rng.random() < q)
        if wants_check(verified, p, rng):
            if lied:
                return step
            verified = True
    return max_steps + 1


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0 <= value <= 1):
        raise ConfigError(f"{name} = {value!r}: must be a probability in [0, 1]")


# ---------------------------------------------------------------- what this client learned


@dataclass(frozen=True)
class Conviction:
    peer_id: str
    model_id: str
    start: int  # the blocks it got wrong
    end: int
    position: int  # first wrong position
    rel_error: float
    witnesses: tuple[str, ...]  # the peers whose outputs outvoted it
    evidence: str  # evidence_digest of the comparison
    at: float  # unix time


class Trust:
    """Peers this client checked: `verified` (a check of theirs agreed) and `convicted` (outvoted; never
    routed through again by this client). Only this client's own checks change it: reports by others are
    never read here, so no reporter can get a peer banned."""

    def __init__(self) -> None:
        self.verified: set[str] = set()
        self.convicted: dict[str, Conviction] = {}

    def convicted_peers(self) -> frozenset[str]:
        return frozenset(self.convicted)

    def convict(self, conviction: Conviction) -> bool:
        """Record a conviction; False if the peer was convicted already (the first one stands)."""
        self.verified.discard(conviction.peer_id)
        if conviction.peer_id in self.convicted:
            return False
        self.convicted[conviction.peer_id] = conviction
        return True


@dataclass
class VerifyStats:
    """Counters of one client's checks (DistributedModelForCausalLM.verify_stats): logs, tests, benchmarks."""

    checks: int = 0  # checks run to an answer
    agreed: int = 0
    mismatches: int = 0  # checks where primary and shadow disagreed
    inconclusive: int = 0  # disagreements no majority settled (no referee, or three different answers)
    ambiguous: int = 0  # disagreements on inputs a peer pushed (not the client's copy): no conviction
    unverifiable: int = 0  # checks that found no second peer (or whose shadow failed)
    rewinds: int = 0  # generate calls replayed from a first wrong position
    reports: int = 0  # reports stored on the DHT
    compared_tokens: int = 0
    max_agreeing_error: float = 0.0  # the largest error seen between two peers that agreed
    peer_steps: Counter = field(default_factory=Counter)  # steps each peer served as a primary
    caught_at: dict = field(default_factory=dict)  # convicted peer -> its primary steps at the check's draw
    convicted: list = field(default_factory=list)  # Conviction objects, in order


def evidence_digest(model_id: str, start: int, end: int, first: int, inputs: torch.Tensor,
                    *outputs: torch.Tensor) -> str:
    """sha256 (hex) of what a conviction rests on: the model and blocks, the first compared position, the
    hop's inputs and each side's outputs over the compared positions (as float32 bytes)."""
    h = hashlib.sha256(f"{model_id}|{start}:{end}|{first}".encode())
    for t in (inputs, *outputs):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ReportLimiter:
    """At most `max_per_hour` reports from this client in any hour, and one per accused peer per hour (the
    DHT keeps one live report per reporter and accused anyway). Pure apart from the injected clock."""

    def __init__(self, max_per_hour: int = 10, clock: Callable[[], float] = time.monotonic):
        if max_per_hour < 0:
            raise ConfigError(f"max_reports_per_hour {max_per_hour!r}: must be >= 0")
        self.max_per_hour = max_per_hour
        self.clock = clock
        self._sent: deque[tuple[float, str]] = deque()

    def allow(self, accused: str) -> bool:
        """Whether a report on `accused` may go out now; counts it if so."""
        now = self.clock()
        while self._sent and now - self._sent[0][0] >= 3600.0:
            self._sent.popleft()
        if len(self._sent) >= self.max_per_hour or any(peer == accused for _, peer in self._sent):
            return False
        self._sent.append((now, accused))
        return True


# ---------------------------------------------------------------- the trail of a generate call


class Rewound(SessionError):
    """A check found that a peer's results from `position` on were wrong: the session went back to
    `resumed` (the start of the generate call, whose verified steps it replays without the network) and
    the call runs again (DistributedModelForCausalLM does it; outside `generate`, feed again from there)."""

    def __init__(self, position: int, resumed: int, peers):
        self.position, self.resumed, self.peers = position, resumed, tuple(sorted(peers))
        who = ", ".join(p[-8:] for p in self.peers) or "a peer"
        super().__init__(f"{who} returned wrong results from position {position} on; the session went back "
                         f"to position {resumed}: feed the tokens after it again")


class Trail:
    """The current call's steps as the session ran them, from position `start`: embeds in ([batch, n,
    hidden], before any local block), valid [batch, n], hidden states out ([batch, n, hidden]).

    After a rewind the caller's position goes back to `start` (`rewind`), and steps that feed the same
    inputs again are answered from here (`serve`) up to the trail's end: no peer runs them twice.
    `cursor`: positions of the trail handed to the caller since; `ahead` = length - cursor.
    """

    def __init__(self, start: int):
        self.start = start
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.length = 0
        self.cursor = 0

    @property
    def ahead(self) -> int:
        return self.length - self.cursor

    def record(self, embeds: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
        """A live step at the trail's end (the caller is at its end: cursor == length)."""
        self.steps.append((embeds.detach(), valid, out.detach()))
        self.length += embeds.shape[1]
        self.cursor = self.length

    def truncate(self, position: int) -> None:
        """Keep positions [start, position) only."""
        keep = max(0, position - self.start)
        if keep >= self.length:
            return
        kept, at = [], 0
        for step in self.steps:
            n = step[0].shape[1]
            if at + n > keep:
                if keep > at:
                    kept.append(tuple(t[:, : keep - at] for t in step))
                break
            kept.append(step)
            at += n
        self.steps, self.length, self.cursor = kept, keep, min(self.cursor, keep)

    def rewind(self) -> torch.Tensor:
        """Send the caller back to `start`; returns [batch] the valid tokens it gave back (for row_tokens)."""
        given = self._joined(0, self.cursor)
        self.cursor = 0
        return given[1].long().sum(-1) if given is not None else 0

    def serve(self, embeds: torch.Tensor, valid: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(n, out [batch, n, hidden]): the longest prefix of this step that equals the trail at the cursor
        (inputs and validity), answered from the trail; the cursor moves past it."""
        n = min(embeds.shape[1], self.ahead)
        if n == 0:
            return 0, None
        trail_embeds, trail_valid, trail_out = self._joined(self.cursor, self.cursor + n)
        same = (trail_embeds.to(embeds.device) == embeds[:, :n]).flatten(2).all(-1).all(0)  # [n]
        same &= (trail_valid.cpu() == valid[:, :n].cpu()).all(0)
        n = int(same.long().cumprod(0).sum())
        if n == 0:
            return 0, None
        self.cursor += n
        return n, trail_out[:, :n]

    def _joined(self, lo: int, hi: int):
        """(embeds, valid, out) of trail offsets [lo, hi), or None if empty."""
        parts, at = [], 0
        for step in self.steps:
            n = step[0].shape[1]
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                parts.append(tuple(t[:, a - at : b - at] for t in step))
            at += n
        if not parts:
            return None
        return tuple(torch.cat([p[k] for p in parts], dim=1) for k in range(3))


def rng_state() -> tuple:
    """torch's global RNG states (CPU, and CUDA where initialized): a rewound call restores them, so a
    sampling `generate` draws the same tokens again where the logits are the same."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.random.get_rng_state(), cuda


def restore_rng(state: tuple) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
