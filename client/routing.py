"""The client's route planner: a pure function from a snapshot of peers to a chain of hops.

A *route* is an ordered list of hops whose spans are contiguous and cover exactly the blocks asked
for (by default the whole model, [0, num_blocks)). A hop may use any sub-range of the span its peer
serves, so overlapping peers are fine and the planner decides where to cut.

The route is a shortest path. Nodes are block boundaries; using peer p for blocks [b, e) costs

    entry(p) + (e - b) * per_block(p)

where entry(p) is the price of one more hop through p (its round-trip time, a fixed per-hop overhead,
its load, a penalty if its cache is short) and per_block(p) is its compute time for one block of one
step, plus a penalty per block when p serves below full precision and the client prefers full
precision. See CostModel for the units. Every cost is >= 0, so a route with fewer hops wins unless the
extra hop buys more than it costs.

Only boundaries where some span starts or ends (plus the ends of the range) can be useful cuts: a
cut strictly inside two spans can slide, at a cost linear in the slide, to one side without getting
worse. So the graph has at most one node per such boundary and one "riding" state per (peer,
boundary). Edges only go forward in block order, i.e. the graph is a DAG, and relaxing its nodes in
block order gives exactly what Dijkstra would, in O(edges) without a heap: at most ~40 000
relaxations for 500 peers over 80 blocks (a few milliseconds).

Determinism: candidates are sorted by (peer_id, span) first; between equal-cost paths the smaller
peer_id wins and a cut goes as early as possible (a peer is never split into two hops), so a
snapshot always gives the same route whatever order it came in. An injected `random.Random` adds a
small multiplicative jitter to spread load over equal peers (off by default).

Precision: a candidate's `precision_bits` is the lowest precision on its path (quantized weights or
an fp8 KV cache; swarm.records.BlockRecord.precision_bits). `min_precision_bits` leaves out the
candidates below it (a client that must match full-precision outputs asks for FULL_PRECISION_BITS);
CostModel.low_precision_block_penalty_s only steers the route away from them.

If no route exists, MissingBlocksError names the blocks no usable peer serves. That is the only way
to fail: when every block is served by some usable peer, the boundary after each block can be
reached from the one before it, so the end is always reachable.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from swarm.errors import ConfigError, MissingBlocksError, format_blocks
from swarm.spans import Span

PEER_STATES = frozenset({"joining", "online", "draining", "offline"})
ROUTABLE_STATE = "online"

# Precision levels a client may ask for (ClientConfig.min_precision) -> the fewest bits a candidate must
# serve at. "full": unquantized weights in a 16-bit or wider dtype and a KV cache in that dtype.
FULL_PRECISION_BITS = 16
MIN_PRECISIONS = {"any": 0, "8bit": 8, "full": FULL_PRECISION_BITS}

# Relative tolerance under which two path costs count as equal, so that float rounding in sums
# taken in different orders cannot break the peer_id tie rule.
_TIE_REL = 1e-12


@dataclass(frozen=True)
class Candidate:
    """One peer as the client sees it in a snapshot (built from its decoded DHT record and a ping).

    compute_tokens_s: the peer's announced compute throughput for ONE block, in tokens per second
        (so running k of its blocks on n tokens takes n * k / compute_tokens_s seconds). Per block,
        because a route may use only part of the peer's span.
    latency_s: measured round-trip time to the peer, or None if not pinged (CostModel supplies a guess).
    active_sessions, queued_tokens: the peer's announced load; queued tokens run through its whole span.
    cache_tokens_left: KV-cache tokens the peer can still allocate, or None if unknown (no penalty).
    precision_bits: the lowest precision on the peer's path, in bits (its weights' or its KV cache's);
        FULL_PRECISION_BITS or more = full precision.

    Raises ValueError on values a strict record decoder would already have refused.
    """

    peer_id: str
    span: Span
    state: str
    compute_tokens_s: float
    latency_s: float | None = None
    active_sessions: int = 0
    queued_tokens: int = 0
    cache_tokens_left: int | None = None
    precision_bits: int = FULL_PRECISION_BITS

    def __post_init__(self) -> None:
        if self.state not in PEER_STATES:
            raise ValueError(f"peer {self.peer_id}: state {self.state!r} not in {sorted(PEER_STATES)}")
        if not (math.isfinite(self.compute_tokens_s) and self.compute_tokens_s > 0):
            raise ValueError(f"peer {self.peer_id}: compute_tokens_s must be finite and > 0")
        if self.latency_s is not None and not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"peer {self.peer_id}: latency_s must be None or finite and >= 0")
        if self.active_sessions < 0 or self.queued_tokens < 0:
            raise ValueError(f"peer {self.peer_id}: load counters must be >= 0")
        if self.cache_tokens_left is not None and self.cache_tokens_left < 0:
            raise ValueError(f"peer {self.peer_id}: cache_tokens_left must be None or >= 0")
        if self.precision_bits < 1:
            raise ValueError(f"peer {self.peer_id}: precision_bits must be >= 1")

    @property
    def full_precision(self) -> bool:
        return self.precision_bits >= FULL_PRECISION_BITS


@dataclass(frozen=True)
class Hop:
    """Use peer `peer_id` for blocks `span` (a sub-range of the span it serves)."""

    peer_id: str
    span: Span


@dataclass(frozen=True)
class CostModel:
    """How the planner prices a hop; every field is in seconds of one generation step unless named.

    default_latency_s: round-trip time assumed for a peer not pinged yet (kept pessimistic, so a
        measured nearby peer wins over an unknown one).
    hop_overhead_s: fixed cost of every hop beyond its RTT (serialization, scheduling, one more
        stream to keep open and to fail); it is what makes fewer hops win between equal peers.
    step_tokens: tokens per step the compute estimate is for (1 for decode; a prompt length to plan
        for prefill).
    session_penalty_s: added per session already active on the peer (they share its compute).
    queue_weight: multiplies the estimated wait for the peer's queued tokens,
        queued_tokens * span.length / compute_tokens_s; 0 ignores queues.
    short_cache_penalty_s: added when the peer's cache_tokens_left < need_cache_tokens. A penalty,
        not an exclusion: such a peer is used only where nothing else serves those blocks (it may
        have freed cache by the time the session opens; if not it refuses and the client fails
        over). Hence no-route always means uncovered blocks, never a full cache.
    low_precision_block_penalty_s: added per block run on a candidate below full precision (quantized
        weights or an fp8 KV cache). 0 (the default): precision does not matter to the route; a large
        value (ClientConfig.prefer_full_precision sets 1 s): quantized peers carry only the blocks no
        full-precision peer serves (to exclude them instead, use a minimum precision).
    jitter_fraction: with an injected random.Random, each peer's costs are multiplied by a factor
        drawn uniformly from [1, 1 + jitter_fraction); without one, no jitter.
    """

    default_latency_s: float = 0.1
    hop_overhead_s: float = 0.01
    step_tokens: int = 1
    session_penalty_s: float = 0.005
    queue_weight: float = 1.0
    short_cache_penalty_s: float = 1000.0
    low_precision_block_penalty_s: float = 0.0
    jitter_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "default_latency_s",
            "hop_overhead_s",
            "session_penalty_s",
            "queue_weight",
            "short_cache_penalty_s",
            "low_precision_block_penalty_s",
            "jitter_fraction",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"CostModel.{name} = {value!r}: must be finite and >= 0")
        if self.step_tokens < 1:
            raise ConfigError(f"CostModel.step_tokens = {self.step_tokens!r}: must be >= 1")


def entry_cost_s(
    candidate: Candidate, need_cache_tokens: int = 0, cost_model: CostModel = CostModel()
) -> float:
    """The price of one hop through `candidate`, independent of how many of its blocks it runs."""
    m = cost_model
    latency_s = m.default_latency_s if candidate.latency_s is None else candidate.latency_s
    queue_s = candidate.queued_tokens * candidate.span.length / candidate.compute_tokens_s
    cost = latency_s + m.hop_overhead_s + m.session_penalty_s * candidate.active_sessions
    cost += m.queue_weight * queue_s
    left = candidate.cache_tokens_left
    if left is not None and left < need_cache_tokens:
        cost += m.short_cache_penalty_s
    return cost


def block_cost_s(candidate: Candidate, cost_model: CostModel = CostModel()) -> float:
    """Compute time of one of `candidate`'s blocks for one step of cost_model.step_tokens tokens, plus the
    low-precision penalty where it applies."""
    penalty = 0.0 if candidate.full_precision else cost_model.low_precision_block_penalty_s
    return cost_model.step_tokens / candidate.compute_tokens_s + penalty


def hop_cost_s(
    candidate: Candidate, span: Span, need_cache_tokens: int = 0, cost_model: CostModel = CostModel()
) -> float:
    """Estimated seconds one step spends on `candidate` for blocks `span` (no jitter)."""
    return entry_cost_s(candidate, need_cache_tokens, cost_model) + span.length * block_cost_s(
        candidate, cost_model
    )


def missing_blocks(
    candidates: Iterable[Candidate],
    num_blocks: int,
    *,
    start_block: int = 0,
    end_block: int | None = None,
    banned: Collection[str] = frozenset(),
    min_precision_bits: int = 0,
) -> list[int]:
    """Blocks in [start_block, end_block) that no online, non-banned candidate of at least
    `min_precision_bits` serves, ascending."""
    lo, hi = _check_range(num_blocks, start_block, end_block)
    return _uncovered([span for _, span in _usable(candidates, banned, lo, hi, min_precision_bits)], lo, hi)


def plan_route(
    candidates: Iterable[Candidate],
    num_blocks: int,
    *,
    model_id: str,
    start_block: int = 0,
    end_block: int | None = None,
    need_cache_tokens: int = 0,
    banned: Collection[str] = frozenset(),
    min_precision_bits: int = 0,
    cost_model: CostModel = CostModel(),
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering exactly [start_block, end_block) (default [0, num_blocks)).

    Only `online` candidates whose peer_id is not in `banned` and whose precision_bits is at least
    `min_precision_bits` are used. Pass start_block/end_block to replan the blocks of a failed span.
    With `rng`, costs get jitter (see CostModel.jitter_fraction).

    Raises MissingBlocksError(model_id, blocks) if some blocks of the range have no usable peer (saying
    so when peers below the minimum precision serve them), and ConfigError if the range is not inside
    [0, num_blocks).
    """
    lo, hi = _check_range(num_blocks, start_block, end_block)
    candidates = list(candidates)
    usable = _usable(candidates, banned, lo, hi, min_precision_bits)
    spans = [span for _, span in usable]
    missing = _uncovered(spans, lo, hi)
    if missing:
        hint = _precision_hint(candidates, banned, missing, min_precision_bits)
        raise MissingBlocksError(model_id, missing, hint)
    entry = [entry_cost_s(c, need_cache_tokens, cost_model) for c, _ in usable]
    block = [block_cost_s(c, cost_model) for c, _ in usable]
    if rng is not None and cost_model.jitter_fraction > 0:
        for i in range(len(usable)):
            factor = 1.0 + rng.random() * cost_model.jitter_fraction
            entry[i] *= factor
            block[i] *= factor
    steps = _shortest_path(spans, entry, block, lo, hi)
    return [Hop(usable[i][0].peer_id, span) for i, span in steps]


def _check_range(num_blocks: int, start_block: int, end_block: int | None) -> tuple[int, int]:
    hi = num_blocks if end_block is None else end_block
    if not (0 <= start_block < hi <= num_blocks):
        raise ConfigError(
            f"cannot route blocks [{start_block}, {hi}) of a {num_blocks}-block model: "
            f"need 0 <= start_block < end_block <= {num_blocks}"
        )
    return start_block, hi


def _usable(
    candidates: Iterable[Candidate], banned: Collection[str], lo: int, hi: int, min_precision_bits: int = 0
) -> list[tuple[Candidate, Span]]:
    """Routable candidates, each with its span clipped to [lo, hi), sorted by (peer_id, span).

    Costs are still priced from the candidate itself (its queue runs through its whole span).
    """
    out = []
    for c in candidates:
        start, end = max(c.span.start, lo), min(c.span.end, hi)
        precise = c.precision_bits >= min_precision_bits
        if c.state == ROUTABLE_STATE and c.peer_id not in banned and precise and start < end:
            out.append((c, Span(start, end)))
    out.sort(key=lambda pair: (pair[0].peer_id, pair[0].span))
    return out


def _precision_hint(
    candidates: Sequence[Candidate], banned: Collection[str], missing: list[int], min_precision_bits: int
) -> str:
    """What to do when lower-precision peers serve some of the `missing` blocks ("" when none do)."""
    if not min_precision_bits:
        return ""
    lower = _usable(candidates, banned, missing[0], missing[-1] + 1)
    served = sorted(set(missing) - set(_uncovered([span for _, span in lower], missing[0], missing[-1] + 1)))
    if not served:
        return ""
    return (f"peers serve blocks {format_blocks(served)} only below the {min_precision_bits}-bit precision "
            "asked for: lower the client's min_precision (e.g. 'any', which accepts quantized spans) or wait for a "
            "peer at that precision")


def _uncovered(spans: Sequence[Span], lo: int, hi: int) -> list[int]:
    covered = [False] * (hi - lo)
    for span in spans:
        covered[span.start - lo : span.end - lo] = [True] * span.length
    return [lo + i for i, ok in enumerate(covered) if not ok]


def _shortest_path(
    spans: Sequence[Span], entry: Sequence[float], block: Sequence[float], lo: int, hi: int
) -> list[tuple[int, Span]]:
    """Cheapest (candidate index, span) chain from lo to hi; every block must be covered.

    Node k is boundary bounds[k]. ride[i] is the cheapest cost of being inside candidate i's hop at
    the current boundary, entered at boundary entered[i]. Boundaries are visited in order: first
    the riders advance over the blocks since the last boundary and the cheapest one that may stop
    here sets best[k]; then every candidate serving the next blocks may be (re-)entered from best[k].
    """
    bounds = sorted({lo, hi} | {s.start for s in spans} | {s.end for s in spans})
    index = {b: k for k, b in enumerate(bounds)}
    starting: list[list[int]] = [[] for _ in bounds]
    for i, s in enumerate(spans):
        starting[index[s.start]].append(i)
    end_k = [index[s.end] for s in spans]

    best = [0.0] * len(bounds)
    back: list[tuple[int, int]] = [(-1, -1)] * len(bounds)  # (candidate, boundary its hop entered at)
    ride = [math.inf] * len(spans)
    entered = [-1] * len(spans)
    active: list[int] = []
    for k in range(len(bounds)):
        if k > 0:
            width = bounds[k] - bounds[k - 1]
            best_i, best_cost = -1, math.inf
            for i in active:
                ride[i] += width * block[i]
                if _cheaper(ride[i], i, best_cost, best_i):
                    best_i, best_cost = i, ride[i]
            best[k], back[k] = best_cost, (best_i, entered[best_i])
            active = [i for i in active if end_k[i] > k]
        active.extend(starting[k])
        for i in active:
            cost = best[k] + entry[i]
            # On a tie keep riding: same cost, one hop fewer in the chain, an earlier cut.
            if cost < ride[i] * (1.0 - _TIE_REL):
                ride[i], entered[i] = cost, k

    steps = []
    k = len(bounds) - 1
    while k > 0:
        i, start_k = back[k]
        steps.append((i, Span(bounds[start_k], bounds[k])))
        k = start_k
    steps.reverse()
    return steps


def _cheaper(cost: float, i: int, best_cost: float, best_i: int) -> bool:
    """Whether (cost, i) beats (best_cost, best_i): lower cost, or a tie and a smaller index."""
    if math.isinf(best_cost):
        return True
    tol = _TIE_REL * max(abs(cost), abs(best_cost))
    return cost < best_cost - tol or (abs(cost - best_cost) <= tol and i < best_i)
