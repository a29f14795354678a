"""Block selection (peer.placement, peer.memory.blocks_that_fit) and the joining shell (peer.rebalance.
place_on_join): pure, on typed snapshots, with a seeded Random and a fake sleep."""

from __future__ import annotations

import asyncio
import random

import pytest

from peer.memory import HEADROOM, blocks_that_fit
from peer.placement import (
    PeerView,
    SwarmSnapshot,
    choose_span,
    coverage,
    peer_view,
    rechoose,
    snapshot_of,
)
from peer.rebalance import place_on_join, typical_tokens_s
from swarm.records import BlockRecord, BlockState
from swarm.spans import Span

ONLINE, JOINING, DRAINING, OFFLINE = (
    BlockState.ONLINE,
    BlockState.JOINING,
    BlockState.DRAINING,
    BlockState.OFFLINE,
)


def record(start: int, end: int, state=ONLINE, per_block_tokens_s: float = 100.0, **fields) -> BlockRecord:
    return BlockRecord(
        model_id="m",
        block=start,
        state=state,
        start=start,
        end=end,
        software_version="0.1.0",
        protocol=1,
        dtype="float32",
        block_hash="ab" * 16,
        compute_tokens_s=per_block_tokens_s,
        network_mbps=0.0,
        cache_tokens_left=100,
        drain_deadline=1.8e9 if state == DRAINING else None,
        **fields,
    )


def view(peer_id: str, start: int, end: int, state=ONLINE, span_tokens_s: float = 10.0) -> PeerView:
    span = Span(start, end)
    counts = span if state in (ONLINE, JOINING) else None
    return PeerView(peer_id, state, span, counts, span_tokens_s)


def snap(num_blocks: int, *peers: PeerView) -> SwarmSnapshot:
    return SwarmSnapshot(num_blocks, tuple(peers))


# ---------------------------------------------------------------- who counts, and how much


def test_span_throughput_is_the_per_block_figure_over_the_span_length():
    assert peer_view("a", record(0, 4, per_block_tokens_s=100.0)).span_tokens_s == 25.0


@pytest.mark.parametrize(
    ("state", "extra", "counts_on"),
    [
        (ONLINE, {}, Span(2, 4)),
        (JOINING, {}, Span(2, 4)),  # it announced its span before loading: it counts, so joiners see it
        (DRAINING, {}, None),  # leaving
        (DRAINING, {"next_start": 0, "next_end": 2}, Span(0, 2)),  # moving: counts where it goes
        (OFFLINE, {}, None),
    ],
)
def test_joining_counts_draining_counts_only_where_it_moves(state, extra, counts_on):
    assert peer_view("a", record(2, 4, state, **extra)).counts_on == counts_on


def test_snapshot_takes_each_peers_record_that_expires_last():
    """A peer that moved from 0:2 to 2:4 still has stale records of 0:2 until they expire."""
    stale, fresh = record(0, 2, DRAINING, next_start=2, next_end=4), record(2, 4, ONLINE)
    entries = {
        0: {"a": (stale, 100.0)},
        1: {"a": (stale, 100.0)},
        2: {"a": (fresh, 130.0), "b": (record(2, 4), 120.0)},
        3: {"a": (fresh, 130.0)},
    }
    s = snapshot_of(entries, 4)
    assert [(p.peer_id, p.state, p.counts_on) for p in s.peers] == [
        ("a", ONLINE, Span(2, 4)),
        ("b", ONLINE, Span(2, 4)),
    ]
    assert coverage(s) == [0.0, 0.0, 100.0, 100.0]


def test_snapshot_leaves_out_spans_past_the_model():
    entries = {0: {"a": (record(0, 9), 1.0)}, 1: {"b": (record(1, 2), 1.0)}}
    assert [p.peer_id for p in snapshot_of(entries, 4).peers] == ["b"]


# ---------------------------------------------------------------- the weakest window


def test_empty_swarm_chooses_the_first_blocks():
    assert choose_span([0.0] * 6, 2) == Span(0, 2)


def test_a_missing_block_wins_over_a_weak_window_with_a_smaller_total():
    #            0     1     2    3    4    5
    cover = [100.0, 0.0, 100.0, 5.0, 5.0, 5.0]
    assert choose_span(cover, 3) == Span(1, 4)  # the hole and a weak block, though 3:6 has the lowest total


def test_ties_go_to_the_earliest_and_then_the_next_weakest_block():
    assert choose_span([7.0, 7.0, 7.0, 7.0], 2) == Span(0, 2)
    assert choose_span([5.0, 9.0, 1.0, 5.0, 1.0, 3.0], 2) == Span(4, 6)  # [1, 3] < [1, 5]


def test_span_must_fit_the_model():
    with pytest.raises(ValueError):
        choose_span([0.0] * 3, 4)


def test_sequential_joiners_cover_the_model_then_replicate():
    spans, s = [], snap(6)
    for i in range(5):
        span = choose_span(coverage(s), 2)
        spans.append(span)
        s = snap(6, *s.peers, view(f"p{i}", span.start, span.end))
    assert spans == [Span(0, 2), Span(2, 4), Span(4, 6), Span(0, 2), Span(2, 4)]


# ---------------------------------------------------------------- concurrent joiners


def test_rechoose_places_the_lower_ids_first_wherever_they_announced():
    s = snap(6, view("A", 0, 2, JOINING), view("B", 0, 2, JOINING), view("C", 0, 2, JOINING))
    assert rechoose(s, "A", 2) == Span(0, 2)  # the lowest id keeps its place
    assert rechoose(s, "B", 2) == Span(2, 4)  # after A
    assert rechoose(s, "C", 2) == Span(4, 6)  # after A, then B (placed at 2:4 though it announced 0:2)
    moved = snap(6, view("A", 0, 2, JOINING), view("B", 2, 4, JOINING), view("C", 0, 2, JOINING))
    assert rechoose(moved, "C", 2) == Span(4, 6)  # the same, whichever re-read came first


def test_rechoose_counts_settled_peers_and_ignores_higher_joiners():
    s = snap(6, view("Z", 0, 2, ONLINE), view("B", 2, 4, JOINING), view("D", 2, 4, JOINING))
    assert rechoose(s, "B", 2) == Span(2, 4)  # Z is online; D (a higher id) yields to B
    assert rechoose(s, "D", 2) == Span(4, 6)


def test_online_peers_count_whatever_their_id():
    s = snap(4, view("Z", 0, 2, ONLINE), view("B", 0, 2, JOINING))
    assert rechoose(s, "B", 2) == Span(2, 4)


class FakeDHT:
    """Shared records of joiners: what `read` returns is what the joiners announced so far."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.views: dict[str, PeerView] = {}
        self.now = 0.0

    async def read(self) -> SwarmSnapshot:
        return snap(self.num_blocks, *self.views.values())

    def announcer(self, peer_id: str):
        async def announce(span: Span) -> None:
            self.views[peer_id] = view(peer_id, span.start, span.end, JOINING)

        return announce


def test_peers_started_at_the_same_instant_spread_over_the_model():
    """Three peers read an empty swarm at the same time; after their jittered re-reads they cover it."""

    async def scenario(seed: int) -> dict[str, Span]:
        dht, rng = FakeDHT(6), random.Random(seed)
        first = await dht.read()

        async def sleep(seconds: float) -> None:
            assert 0.5 <= seconds <= 1.0  # [jitter/2, jitter]
            await asyncio.sleep(seconds / 100)  # the three re-read in a random order

        chosen = await asyncio.gather(
            *(
                place_on_join(first, dht.read, dht.announcer(p), p, 2, 1.0, rng, sleep)
                for p in ("Qa", "Qb", "Qc")
            )
        )
        return dict(zip(("Qa", "Qb", "Qc"), chosen, strict=True))

    for seed in range(8):
        spans = asyncio.run(scenario(seed))
        assert spans["Qa"] == Span(0, 2), (seed, spans)  # everyone's first pick; the lowest id keeps it
        assert sorted(spans.values()) == [Span(0, 2), Span(2, 4), Span(4, 6)], (seed, spans)


def test_without_jitter_the_first_choice_stands():
    dht = FakeDHT(4)

    async def go():
        return await place_on_join(
            await dht.read(), dht.read, dht.announcer("a"), "a", 2, 0.0, random.Random(0)
        )

    assert asyncio.run(go()) == Span(0, 2) and dht.views["a"].span == Span(0, 2)


def test_a_joining_peer_of_unknown_speed_announces_a_typical_one():
    s = snap(
        4,
        view("a", 0, 2, span_tokens_s=50.0),
        view("b", 2, 4, span_tokens_s=200.0),
        view("c", 0, 4, DRAINING, span_tokens_s=1e6),
    )
    assert typical_tokens_s(s) == pytest.approx(250.0)  # median of 100 and 400 per block; draining left out
    assert typical_tokens_s(snap(4)) == 1.0


# ---------------------------------------------------------------- how many blocks fit


def test_blocks_that_fit_counts_the_heaviest_blocks_kv_and_fixed_reserve():
    weights = [100, 300, 100, 300]  # e.g. dense and sparse blocks alternating
    # two heaviest: 600 weights + 2 x 50 KV + 200 fixed = 900
    assert blocks_that_fit(int(900 * HEADROOM) + 1, weights, 50, 200) == 2
    assert blocks_that_fit(int(900 * HEADROOM) - 1, weights, 50, 200) == 1
    assert blocks_that_fit(10**9, weights, 50, 200) == 4
    assert blocks_that_fit(int(300 * HEADROOM), weights, 50, 200) == 0
