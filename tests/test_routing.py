"""Pure tests of the client's route planner (client/routing.py): no network, no model."""

from __future__ import annotations

import math
import random

import pytest

from client.routing import (
    Candidate,
    CostModel,
    Hop,
    hop_cost_s,
    missing_blocks,
    plan_route,
)
from swarm.errors import ConfigError, MissingBlocksError, RoutingError
from swarm.spans import Span

MODEL = "tiny-model"


def peer(
    peer_id: str,
    start: int,
    end: int,
    *,
    state: str = "online",
    speed: float = 1000.0,
    latency: float | None = 0.01,
    sessions: int = 0,
    queued: int = 0,
    cache: int | None = None,
) -> Candidate:
    return Candidate(
        peer_id,
        Span(start, end),
        state,
        compute_tokens_s=speed,
        latency_s=latency,
        active_sessions=sessions,
        queued_tokens=queued,
        cache_tokens_left=cache,
    )


def route(candidates: list[Candidate], num_blocks: int, **kwargs) -> list[tuple[str, int, int]]:
    hops = plan_route(candidates, num_blocks, model_id=MODEL, **kwargs)
    return [(h.peer_id, h.span.start, h.span.end) for h in hops]


def assert_exact_cover(hops: list[Hop], candidates: list[Candidate], lo: int, hi: int) -> None:
    """Hops are contiguous, cover exactly [lo, hi), and each lies inside its peer's own span."""
    assert hops[0].span.start == lo and hops[-1].span.end == hi
    for a, b in zip(hops, hops[1:], strict=False):
        assert a.span.end == b.span.start
    spans = {(c.peer_id, c.span) for c in candidates}
    for h in hops:
        assert any(pid == h.peer_id and s.start <= h.span.start and h.span.end <= s.end for pid, s in spans)


def route_cost(hops: list[Hop], candidates: list[Candidate], cost_model: CostModel, need: int = 0) -> float:
    by_id = {c.peer_id: c for c in candidates}
    return sum(hop_cost_s(by_id[h.peer_id], h.span, need, cost_model) for h in hops)


def reference_cost(
    candidates: list[Candidate], lo: int, hi: int, cost_model: CostModel, need: int = 0
) -> float:
    """Optimal cost by brute force over every block boundary (no pruning of cut points)."""
    usable = [c for c in candidates if c.state == "online"]
    best = {lo: 0.0}
    for e in range(lo + 1, hi + 1):
        best[e] = min(
            (
                best[b] + hop_cost_s(c, Span(b, e), need, cost_model)
                for c in usable
                if c.span.start < e <= c.span.end
                for b in range(max(c.span.start, lo), e)
            ),
            default=math.inf,
        )
    return best[hi]


def random_candidates(rng: random.Random, n: int, num_blocks: int, max_len: int) -> list[Candidate]:
    out = []
    for i in range(n):
        start = rng.randrange(num_blocks)
        end = min(num_blocks, start + rng.randint(1, max_len))
        out.append(
            peer(
                f"p{i:03d}",
                start,
                end,
                state=rng.choice(["online"] * 6 + ["joining", "draining", "offline"]),
                speed=rng.uniform(10.0, 2000.0),
                latency=rng.choice([None, rng.uniform(0.001, 0.3)]),
                sessions=rng.randint(0, 5),
                queued=rng.randint(0, 50),
                cache=rng.choice([None, rng.randint(0, 4096)]),
            )
        )
    return out


# --- basic shapes -----------------------------------------------------------------------------------


def test_chain_of_three_unequal_spans():
    cands = [peer("c", 7, 10), peer("a", 0, 2), peer("b", 2, 7)]
    assert route(cands, 10) == [("a", 0, 2), ("b", 2, 7), ("c", 7, 10)]


def test_overlapping_spans_prefer_one_hop_over_two():
    cands = [peer("a", 0, 6), peer("b", 4, 10), peer("whole", 0, 10)]
    assert route(cands, 10) == [("whole", 0, 10)]


def test_overlap_cut_gives_more_blocks_to_the_faster_peer():
    # a serves [0, 6), b serves [3, 10): blocks 3:6 can go either way.
    fast_a = [peer("a", 0, 6, speed=1000.0), peer("b", 3, 10, speed=100.0)]
    assert route(fast_a, 10) == [("a", 0, 6), ("b", 6, 10)]
    fast_b = [peer("a", 0, 6, speed=100.0), peer("b", 3, 10, speed=1000.0)]
    assert route(fast_b, 10) == [("a", 0, 3), ("b", 3, 10)]


def test_two_fast_hops_beat_one_slow_hop_when_compute_dominates():
    cands = [peer("slow", 0, 10, speed=10.0), peer("a", 0, 5), peer("b", 5, 10)]
    assert route(cands, 10) == [("a", 0, 5), ("b", 5, 10)]


def test_slow_peer_avoided_whatever_its_id():
    for fast_id, slow_id in [("a", "b"), ("b", "a")]:
        cands = [peer(slow_id, 0, 8, speed=50.0), peer(fast_id, 0, 8, speed=500.0)]
        assert route(cands, 8) == [(fast_id, 0, 8)]


def test_high_latency_peer_avoided_whatever_its_id():
    for near_id, far_id in [("a", "b"), ("b", "a")]:
        cands = [peer(far_id, 0, 8, latency=0.5), peer(near_id, 0, 8, latency=0.005)]
        assert route(cands, 8) == [(near_id, 0, 8)]


def test_unknown_latency_uses_the_configured_guess():
    cands = [peer("measured", 0, 4, latency=0.05), peer("unpinged", 0, 4, latency=None)]
    assert route(cands, 4) == [("measured", 0, 4)]  # default guess 0.1 s > 0.05 s
    optimistic = CostModel(default_latency_s=0.0)
    assert route(cands, 4, cost_model=optimistic) == [("unpinged", 0, 4)]


# --- exclusion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["joining", "draining", "offline"])
def test_non_online_peers_excluded(state):
    cands = [peer("best", 0, 6, state=state, speed=1e6, latency=0.0), peer("ok", 0, 6)]
    assert route(cands, 6) == [("ok", 0, 6)]
    with pytest.raises(MissingBlocksError) as err:
        route([cands[0]], 6)
    assert err.value.missing == [0, 1, 2, 3, 4, 5]


def test_banned_peers_excluded():
    cands = [peer("best", 0, 6, speed=1e6, latency=0.0), peer("ok", 0, 3), peer("ok2", 3, 6)]
    assert route(cands, 6) == [("best", 0, 6)]
    assert route(cands, 6, banned={"best"}) == [("ok", 0, 3), ("ok2", 3, 6)]
    assert missing_blocks(cands, 6, banned={"best", "ok2"}) == [3, 4, 5]


# --- missing blocks --------------------------------------------------------------------------------


def test_missing_blocks_reported_exactly():
    cands = [peer("a", 0, 4), peer("b", 6, 10), peer("c", 5, 8, state="draining")]
    assert missing_blocks(cands, 10) == [4, 5]
    with pytest.raises(MissingBlocksError) as err:
        route(cands, 10)
    assert err.value.missing == [4, 5]
    assert err.value.model_id == MODEL
    assert "4:6" in str(err.value)
    assert isinstance(err.value, RoutingError)


def test_missing_blocks_at_the_edges_and_empty_snapshot():
    assert missing_blocks([peer("a", 1, 3)], 5) == [0, 3, 4]
    assert missing_blocks([], 3) == [0, 1, 2]
    with pytest.raises(MissingBlocksError) as err:
        route([], 3)
    assert err.value.missing == [0, 1, 2]


def test_no_route_exactly_when_some_block_is_uncovered():
    """The claim the planner rests on: full coverage always yields a route (spans cut anywhere)."""
    rng = random.Random(7)
    outcomes = set()
    for _ in range(300):
        num_blocks = rng.randint(1, 12)
        cands = random_candidates(rng, rng.randint(0, 6), num_blocks, max_len=5)
        missing = missing_blocks(cands, num_blocks)
        expected = [
            b for b in range(num_blocks) if not any(c.state == "online" and b in c.span for c in cands)
        ]
        assert missing == expected
        try:
            hops = plan_route(cands, num_blocks, model_id=MODEL)
        except MissingBlocksError as err:
            assert err.missing == missing
            outcomes.add("missing")
        else:
            assert not missing
            assert_exact_cover(hops, cands, 0, num_blocks)
            outcomes.add("route")
    assert outcomes == {"missing", "route"}  # both branches were exercised


# --- sub-ranges (failover replanning) --------------------------------------------------------------


def test_sub_range_uses_part_of_a_span():
    cands = [peer("a", 0, 10)]
    assert route(cands, 10, start_block=3, end_block=7) == [("a", 3, 7)]


def test_sub_range_ignores_gaps_outside_it():
    cands = [peer("a", 0, 4), peer("b", 4, 6), peer("c", 8, 10)]  # blocks 6:8 missing
    assert route(cands, 10, start_block=2, end_block=6) == [("a", 2, 4), ("b", 4, 6)]
    assert missing_blocks(cands, 10, start_block=5, end_block=10) == [6, 7]
    with pytest.raises(MissingBlocksError) as err:
        route(cands, 10, start_block=5, end_block=10)
    assert err.value.missing == [6, 7]


def test_sub_range_replans_around_a_failed_peer():
    cands = [peer("a", 0, 4), peer("bad", 4, 8), peer("b", 4, 6), peer("c", 6, 12), peer("d", 8, 12)]
    assert route(cands, 12, start_block=4, end_block=8, banned={"bad"}) == [("b", 4, 6), ("c", 6, 8)]


@pytest.mark.parametrize("start,end", [(-1, 4), (4, 4), (5, 3), (0, 11)])
def test_bad_range_is_a_config_error(start, end):
    with pytest.raises(ConfigError):
        route([peer("a", 0, 10)], 10, start_block=start, end_block=end)


# --- determinism and jitter ------------------------------------------------------------------------


def test_same_snapshot_any_order_same_route():
    rng = random.Random(1)
    cands = random_candidates(rng, 60, 24, max_len=10) + [peer(f"twin{i}", 0, 24) for i in range(5)]
    first = plan_route(cands, 24, model_id=MODEL)
    for _ in range(10):
        rng.shuffle(cands)
        assert plan_route(cands, 24, model_id=MODEL) == first


def test_equal_peers_tie_broken_by_peer_id():
    cands = [peer(pid, 0, 5) for pid in ["m", "c", "x", "d"]]
    assert route(cands, 5) == [("c", 0, 5)]


def test_equal_cost_overlap_cuts_as_early_as_possible():
    cands = [peer("a", 0, 6), peer("b", 3, 10)]  # equal speed: any cut in 3..6 costs the same
    assert route(cands, 10) == [("a", 0, 3), ("b", 3, 10)]


def test_free_hops_never_split_a_peer_into_two_hops():
    free = CostModel(default_latency_s=0.0, hop_overhead_s=0.0)
    cands = [peer("a", 0, 8, latency=None), peer("b", 2, 5, latency=None, speed=10.0)]
    assert route(cands, 8, cost_model=free) == [("a", 0, 8)]


def test_jitter_is_reproducible_and_spreads_load():
    cands = [peer(f"p{i}", 0, 5) for i in range(8)]
    picks = {route(cands, 5, rng=random.Random(seed))[0][0] for seed in range(40)}
    assert len(picks) > 3
    assert route(cands, 5, rng=random.Random(3)) == route(cands, 5, rng=random.Random(3))


def test_jitter_is_too_small_to_pick_a_clearly_worse_peer():
    cands = [peer("fast", 0, 5, speed=1000.0), peer("a_slow", 0, 5, speed=100.0)]
    for seed in range(20):
        assert route(cands, 5, rng=random.Random(seed)) == [("fast", 0, 5)]


# --- load and cache --------------------------------------------------------------------------------


def test_active_sessions_move_the_route():
    idle = [peer("a", 0, 6), peer("b", 0, 6)]
    assert route(idle, 6) == [("a", 0, 6)]
    busy = [peer("a", 0, 6, sessions=4), peer("b", 0, 6, sessions=1)]
    assert route(busy, 6) == [("b", 0, 6)]


def test_queued_tokens_move_the_route():
    cands = [peer("a", 0, 6, queued=200), peer("b", 0, 6)]
    assert route(cands, 6) == [("b", 0, 6)]
    assert route(cands, 6, cost_model=CostModel(queue_weight=0.0)) == [("a", 0, 6)]


def test_short_cache_is_avoided_but_used_as_last_resort():
    cands = [peer("a", 0, 6, cache=100, speed=1e6), peer("b", 0, 6, cache=5000)]
    assert route(cands, 6, need_cache_tokens=1000) == [("b", 0, 6)]
    assert route(cands, 6, need_cache_tokens=50) == [("a", 0, 6)]
    assert route(cands[:1], 6, need_cache_tokens=1000) == [("a", 0, 6)]  # penalty, not exclusion


# --- optimality and scale --------------------------------------------------------------------------


def test_route_cost_matches_brute_force_on_random_snapshots():
    """Pruning cuts to span boundaries and riding states must not lose the optimum."""
    rng = random.Random(42)
    checked = 0
    for _ in range(200):
        num_blocks = rng.randint(1, 10)
        cands = random_candidates(rng, rng.randint(1, 7), num_blocks, max_len=6)
        model = CostModel(step_tokens=rng.choice([1, 64]), hop_overhead_s=rng.choice([0.0, 0.01]))
        need = rng.choice([0, 1000])
        if missing_blocks(cands, num_blocks):
            continue
        hops = plan_route(cands, num_blocks, model_id=MODEL, cost_model=model, need_cache_tokens=need)
        assert_exact_cover(hops, cands, 0, num_blocks)
        got = route_cost(hops, cands, model, need)
        assert got == pytest.approx(reference_cost(cands, 0, num_blocks, model, need), rel=1e-9)
        checked += 1
    assert checked > 50


def test_500_candidates_over_80_blocks():
    rng = random.Random(2024)
    cands = random_candidates(rng, 500, 80, max_len=40)
    assert not missing_blocks(cands, 80)
    model = CostModel()
    hops = plan_route(cands, 80, model_id=MODEL, cost_model=model)
    assert_exact_cover(hops, cands, 0, 80)
    assert route_cost(hops, cands, model) == pytest.approx(reference_cost(cands, 0, 80, model), rel=1e-9)
    sub = plan_route(cands, 80, model_id=MODEL, start_block=17, end_block=53)
    assert_exact_cover(sub, cands, 17, 53)


# --- input contracts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "gone"},
        {"speed": 0.0},
        {"speed": math.nan},
        {"latency": -1.0},
        {"sessions": -1},
        {"cache": -5},
    ],
)
def test_candidate_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        peer("a", 0, 4, **kwargs)


def test_cost_model_rejects_negative_or_nonfinite_fields():
    with pytest.raises(ConfigError):
        CostModel(hop_overhead_s=-0.1)
    with pytest.raises(ConfigError):
        CostModel(default_latency_s=math.inf)
    with pytest.raises(ConfigError):
        CostModel(step_tokens=0)
