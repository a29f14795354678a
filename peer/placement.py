"""Block selection and rebalancing: pure functions of a typed snapshot of the swarm (no network, no clock).

Coverage. Block b's coverage is the summed span throughput of the peers that count on it: tokens per
second that can pass through b, where a peer of per-block throughput r (the record's compute_tokens_s)
serving k blocks adds r / k to each of its blocks (a token through its span costs k block forwards). Who
counts, from each peer's freshest record (the one that expires last, i.e. was announced last):
  - `online` and `joining` peers, on their span (a joining peer announced its span before loading it,
    so peers starting together see each other);
  - `draining` peers that drain to move (`next_start`/`next_end`), on the span they move to;
  - not other draining peers, nor `offline` ones.

Choice of a span of k blocks (`choose_span`): the weakest window, i.e. the window whose coverages, sorted
ascending, are lexicographically smallest: first the window holding the weakest block (a missing block,
coverage 0, before anything else), ties broken by its next weakest block and so on, then the earliest.

Concurrent joiners (`rechoose`): a peer announces `joining` with its first choice, waits a short random
delay, reads again and chooses again as if the joining peers had joined one after another in peer id
order: the joiners with a lower id are placed first (each in the weakest window), then itself; those with
a higher id do not count. Every joiner that saw the same joining records computes the same placement, so
one round spreads peers started at the same instant. (A joiner that chose long ago against other online
peers may be placed elsewhere in this simulation than where it is; the rebalancer corrects what is left.)

Rebalancing (`rebalance_target`): the swarm's quality is the number of uncovered blocks, then its
minimum coverage m. A peer moves only when its best other span
  - makes fewer blocks uncovered; or, with none uncovered either way,
  - raises the minimum coverage above m x (1 + margin) (hysteresis); or
  - keeps the minimum and lowers the number of "weak" blocks, those below m x (1 + margin): when several
    blocks share the minimum (a swarm of equal peers has many), no single move raises it, but each such
    move lifts some of them clear of it, and enough of them do.
Every move so made raises (m, then fewer weak blocks) and the minimum never falls, so moves cannot cycle;
a move between equally good places (e.g. from a block with three replicas to one with two, among equal
peers) is never made. A peer that alone serves a block never moves away from it unless that strictly
reduces the uncovered blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.records import BlockRecord, BlockState
from swarm.spans import Span


@dataclass(frozen=True)
class PeerView:
    """One peer as placement sees it. `counts_on`: the span it adds throughput to (None: it adds none)."""

    peer_id: str
    state: BlockState
    span: Span
    counts_on: Span | None
    span_tokens_s: float  # tokens/s through its whole span (compute_tokens_s per block / blocks)


@dataclass(frozen=True)
class SwarmSnapshot:
    """The peers serving one model of `num_blocks` blocks, as read from the DHT at one moment."""

    num_blocks: int
    peers: tuple[PeerView, ...]

    def without(self, peer_id: str) -> SwarmSnapshot:
        return SwarmSnapshot(self.num_blocks, tuple(p for p in self.peers if p.peer_id != peer_id))

    def union(self, newer: SwarmSnapshot) -> SwarmSnapshot:
        """Every peer of either read, as `newer` saw it where it saw it (a read may miss records)."""
        views = {p.peer_id: p for p in self.peers} | {p.peer_id: p for p in newer.peers}
        return SwarmSnapshot(newer.num_blocks, tuple(views[k] for k in sorted(views)))


def peer_view(peer_id: str, record: BlockRecord) -> PeerView:
    span = record.span
    if record.state in (BlockState.ONLINE, BlockState.JOINING):
        counts_on = span
    elif record.state == BlockState.DRAINING:
        counts_on = record.next_span
    else:
        counts_on = None
    return PeerView(peer_id, record.state, span, counts_on, record.compute_tokens_s / span.length)


def snapshot_of(
    entries: Mapping[int, Mapping[str, tuple[BlockRecord, float]]], num_blocks: int
) -> SwarmSnapshot:
    """From {block: {peer_id: (record, expiration_time)}} (records.fetch_block_entries): one view per peer,
    from its record that expires last. Spans reaching past `num_blocks` are left out (another model's
    layout, or a confused peer)."""
    freshest: dict[str, tuple[float, BlockRecord]] = {}
    for block_entries in entries.values():
        for peer_id, (record, expiration) in block_entries.items():
            if peer_id not in freshest or expiration > freshest[peer_id][0]:
                freshest[peer_id] = (expiration, record)
    views = [peer_view(peer_id, record) for peer_id, (_, record) in sorted(freshest.items())]
    fits = [
        v
        for v in views
        if v.span.end <= num_blocks and (v.counts_on is None or v.counts_on.end <= num_blocks)
    ]
    return SwarmSnapshot(num_blocks, tuple(fits))


def coverage(snapshot: SwarmSnapshot) -> list[float]:
    """Per block, the summed span throughput of the peers that count on it (module docstring)."""
    out = [0.0] * snapshot.num_blocks
    for peer in snapshot.peers:
        if peer.counts_on is not None:
            for block in range(peer.counts_on.start, peer.counts_on.end):
                out[block] += peer.span_tokens_s
    return out


def choose_span(cover: Sequence[float], length: int) -> Span:
    """The weakest window of `length` blocks over per-block coverage `cover` (module docstring)."""
    if not 1 <= length <= len(cover):
        raise ValueError(f"a span of {length} blocks does not fit a model of {len(cover)} blocks")
    return min(
        (Span(start, start + length) for start in range(len(cover) - length + 1)),
        key=lambda span: (sorted(cover[span.start : span.end]), span.start),
    )


def rechoose(snapshot: SwarmSnapshot, peer_id: str, length: int) -> Span:
    """The span `peer_id` takes after its jittered re-read (module docstring): the joining peers with a
    lower peer id are placed first, one by one in id order, each in the weakest window of its length
    (where they announced themselves does not matter, so every joiner that read the same records computes
    the same placement, whatever order the re-reads came in); then this peer takes the weakest window left.
    Joining peers with a higher id do not count: they yield to this one."""
    settled = SwarmSnapshot(
        snapshot.num_blocks,
        tuple(p for p in snapshot.peers if p.peer_id != peer_id and p.state != BlockState.JOINING),
    )
    cover = coverage(settled)
    earlier = sorted(
        (p for p in snapshot.peers if p.state == BlockState.JOINING and p.peer_id < peer_id),
        key=lambda p: p.peer_id,
    )
    for peer in earlier:
        cover = with_peer(cover, choose_span(cover, peer.span.length), peer.span_tokens_s)
    return choose_span(cover, length)


@dataclass(frozen=True, order=True)
class Quality:
    """How well a swarm is covered; compares better-is-greater: fewer uncovered blocks first, then the
    per-block coverages sorted ascending, lexicographically (a higher minimum, or the same minimum on
    fewer blocks, and so on: "leximin")."""

    neg_uncovered: int
    sorted_coverage: tuple[float, ...]

    @property
    def uncovered(self) -> int:
        return -self.neg_uncovered

    @property
    def min_coverage(self) -> float:
        return self.sorted_coverage[0]


def quality(cover: Sequence[float]) -> Quality:
    return Quality(-sum(1 for c in cover if c <= 0.0), tuple(sorted(cover)))


def _weak(cover: Sequence[float], threshold: float) -> int:
    return sum(1 for c in cover if c < threshold)


def with_peer(cover: Sequence[float], span: Span, span_tokens_s: float) -> list[float]:
    out = list(cover)
    for block in range(span.start, span.end):
        out[block] += span_tokens_s
    return out


@dataclass(frozen=True)
class MoveDecision:
    """`target` None: stay. Otherwise the span to move to, with the qualities before and after."""

    target: Span | None
    before: Quality
    after: Quality
    reason: str


def rebalance_target(
    snapshot: SwarmSnapshot, peer_id: str, current: Span, span_tokens_s: float, margin: float
) -> MoveDecision:
    """Whether `peer_id`, serving `current` at `span_tokens_s`, should move, and where (module docstring).

    Candidates are the spans of the same length, ranked with this peer on them by: fewer uncovered blocks,
    a higher minimum, fewer weak blocks (below the current minimum x (1 + margin)), then the sorted
    coverages (leximin), the weakest window and the earliest start. The peer itself counts on `current` in
    the "before" picture whatever its records say (they may lag).
    """
    others = coverage(snapshot.without(peer_id))
    now = with_peer(others, current, span_tokens_s)
    before = quality(now)
    threshold = before.min_coverage * (1.0 + margin)

    def rank(span: Span) -> tuple:
        cover = with_peer(others, span, span_tokens_s)
        q = quality(cover)
        weakest_first = [-c for c in sorted(others[span.start : span.end])]
        return q.neg_uncovered, q.min_coverage, -_weak(cover, threshold), q.sorted_coverage, weakest_first, -span.start

    best = max((Span(s, s + current.length) for s in range(snapshot.num_blocks - current.length + 1)), key=rank)
    then = with_peer(others, best, span_tokens_s)
    after = quality(then)
    if best == current:
        return MoveDecision(None, before, before, "already on the best span")
    if after.uncovered != before.uncovered or before.uncovered > 0:
        if after.uncovered < before.uncovered:
            return MoveDecision(best, before, after, f"covers {before.uncovered - after.uncovered} more block(s)")
        return MoveDecision(None, before, after, "would not cover more blocks")
    if after.min_coverage > threshold:
        return MoveDecision(best, before, after, (
            f"raises the minimum coverage {before.min_coverage:.3g} -> {after.min_coverage:.3g} tokens/s"))
    weak_before, weak_after = _weak(now, threshold), _weak(then, threshold)
    if after.min_coverage >= before.min_coverage and weak_after < weak_before:
        return MoveDecision(best, before, after, (
            f"lifts {weak_before - weak_after} of the {weak_before} blocks within {margin:.0%} of the minimum "
            f"coverage ({before.min_coverage:.3g} tokens/s) above it"))
    return MoveDecision(None, before, after, f"gain below the {margin:.0%} margin")

