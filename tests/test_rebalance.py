"""Rebalancing: the decision (peer.placement.rebalance_target) and the loop (peer.rebalance.Rebalancer),
with a virtual clock and seeded randomness: pure, no network. The real move (drain, load, announce) with
real processes is in test_rebalance_swarm.py."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random

import pytest

from peer.placement import PeerView, SwarmSnapshot, choose_span, coverage, quality, rebalance_target
from peer.rebalance import PeerPosition, Rebalancer
from swarm.records import BlockState
from swarm.spans import Span

ONLINE, JOINING, DRAINING = BlockState.ONLINE, BlockState.JOINING, BlockState.DRAINING


def view(
    peer_id: str, start: int, end: int, state=ONLINE, tokens_s: float = 10.0, next_span: Span | None = None
) -> PeerView:
    span = Span(start, end)
    counts = span if state in (ONLINE, JOINING) else next_span
    return PeerView(peer_id, state, span, counts, tokens_s)


def decide(num_blocks: int, me: str, *peers: PeerView, margin: float = 0.2):
    snapshot = SwarmSnapshot(num_blocks, tuple(peers))
    mine = next(p for p in peers if p.peer_id == me)
    return rebalance_target(snapshot, me, mine.span, mine.span_tokens_s, margin)


# ---------------------------------------------------------------- the decision


def test_moves_where_it_raises_the_minimum_beyond_the_margin():
    peers = (view("a", 0, 2), view("b", 0, 2), view("c", 0, 2), view("d", 2, 4))
    d = decide(4, "a", *peers)
    assert d.target == Span(2, 4) and (d.before.min_coverage, d.after.min_coverage) == (10.0, 20.0)
    assert decide(4, "a", *peers, margin=1.5).target is None  # +100% is below a 150% margin


def test_a_small_gain_is_not_worth_a_move():
    # moving a from 0:2 to 2:4 raises the minimum only 9 -> 10 (+11%)
    d = decide(4, "a", view("a", 0, 2), view("b", 0, 2), view("c", 2, 4, tokens_s=9.0))
    assert d.target is None and "margin" in d.reason


def test_the_only_peer_of_a_block_never_leaves_it_for_more_throughput_elsewhere():
    # a alone serves 0:2; 2:4 is weak but covered: moving would open a hole
    d = decide(4, "a", view("a", 0, 2, tokens_s=1000.0), view("b", 2, 4, tokens_s=1.0), margin=0.0)
    assert d.target is None and d.before.uncovered == 0


def test_the_only_peer_of_a_block_does_not_trade_its_hole_for_another():
    # 4:6 is uncovered; a alone serves 0:2: moving there leaves 0:2 uncovered instead (no strict gain)
    d = decide(6, "a", view("a", 0, 2), view("c", 2, 4), margin=0.0)
    assert d.target is None and d.before.uncovered == 2


def test_a_replica_moves_to_cover_a_hole_whatever_the_margin():
    d = decide(6, "b", view("a", 0, 2), view("b", 0, 2), view("c", 2, 4), margin=100.0)
    assert d.target == Span(4, 6) and (d.before.uncovered, d.after.uncovered) == (2, 0)


def test_a_partial_overlap_move_keeps_the_blocks_it_alone_serves():
    # a serves 0:3 alone on block 0; moving to 1:4 would uncover block 0; b covers 1:3 twice over
    d = decide(4, "a", view("a", 0, 3), view("b", 1, 3), view("c", 1, 3), margin=0.0)
    assert d.target is None  # 3 is uncovered, but 0 would be instead
    d = decide(4, "b", view("a", 0, 3), view("b", 1, 3), view("c", 1, 3), margin=0.0)
    assert d.target == Span(2, 4)  # a replica covers block 3 while keeping 2 covered


def test_already_on_the_best_span_stays():
    d = decide(4, "a", view("a", 0, 2), view("b", 2, 4))
    assert d.target is None and d.reason == "already on the best span"


def test_a_peer_draining_to_move_counts_where_it_goes():
    mover = view("x", 0, 2, DRAINING, next_span=Span(2, 4))
    # without x's destination, 2:4 would be uncovered and a replica of 0:2 would go there
    d = decide(4, "b", view("a", 0, 2), view("b", 0, 2), mover)
    assert d.target is None


def test_a_leaving_peer_does_not_count():
    leaving = view("x", 2, 4, DRAINING)
    d = decide(4, "b", view("a", 0, 2), view("b", 0, 2), leaving)
    assert d.target == Span(2, 4)


# ---------------------------------------------------------------- the loop, on a virtual clock


class VirtualClock:
    """asyncio sleeps on virtual time: `advance(t)` wakes every sleeper due by then, in time order."""

    def __init__(self):
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + seconds, next(self._seq), future))
        await future

    async def advance(self, until: float) -> None:
        while True:
            await _settle()
            if not self._heap or self._heap[0][0] > until:
                break
            when, _, future = heapq.heappop(self._heap)
            self.now = when
            future.set_result(None)
        self.now = until


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class FakeSwarm:
    """Peers' views, read and changed by the rebalancers (a move: draining towards the target at once,
    online there `load_s` later on the virtual clock)."""

    def __init__(self, clock: VirtualClock, num_blocks: int, *peers: PeerView, load_s: float = 5.0):
        self.clock, self.num_blocks, self.load_s = clock, num_blocks, load_s
        self.views = {p.peer_id: p for p in peers}
        self.moves: list[tuple[float, str, Span]] = []
        self.reads = 0

    async def read(self) -> SwarmSnapshot:
        self.reads += 1
        return SwarmSnapshot(self.num_blocks, tuple(self.views.values()))

    def rebalancer(self, peer_id: str, seed: int, **settings) -> Rebalancer:
        def position() -> PeerPosition:
            v = self.views[peer_id]
            return PeerPosition(peer_id, v.span, v.span_tokens_s, v.state == ONLINE)

        async def move(target: Span) -> None:
            v = self.views[peer_id]
            self.moves.append((self.clock.now, peer_id, target))
            self.views[peer_id] = view(peer_id, v.span.start, v.span.end, DRAINING, v.span_tokens_s, target)
            await self.clock.sleep(self.load_s)
            self.views[peer_id] = view(peer_id, target.start, target.end, ONLINE, v.span_tokens_s)

        return Rebalancer(
            read=self.read,
            position=position,
            move=move,
            rng=random.Random(seed),
            sleep=self.clock.sleep,
            **({"period_s": 60.0, "margin": 0.2, "delay_s": 10.0} | settings),
        )


def run_for(clock: VirtualClock, rebalancers: list[Rebalancer], seconds: float) -> None:
    async def scenario():
        tasks = [asyncio.create_task(r.run()) for r in rebalancers]
        try:
            await clock.advance(seconds)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def crowded() -> tuple[PeerView, ...]:
    """Three peers on 0:2 and one on 2:4: one move (any one of the three) evens it out, a second would not."""
    return view("a", 0, 2), view("b", 0, 2), view("c", 0, 2), view("d", 2, 4)


@pytest.mark.parametrize("seed", range(5))
def test_of_many_peers_that_could_move_only_one_does(seed):
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 4, *crowded())
    rebalancers = [swarm.rebalancer(p, seed * 10 + i) for i, p in enumerate("abcd")]
    run_for(clock, rebalancers, seconds=20 * 60)
    assert len(swarm.moves) == 1, swarm.moves
    _, mover, target = swarm.moves[0]
    assert mover in "abc" and target == Span(2, 4)
    assert sorted(v.span for v in swarm.views.values()) == [Span(0, 2), Span(0, 2), Span(2, 4), Span(2, 4)]


def test_the_check_waits_a_seeded_random_delay_and_reads_again():
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 4, *crowded())
    r = swarm.rebalancer("a", seed=7)
    expected = random.Random(7)
    first_period = 60.0 * expected.uniform(0.75, 1.25)
    delay = expected.uniform(0, 10.0)
    run_for(clock, [r], seconds=first_period + delay + 1)
    assert clock.sleeps[:2] == [pytest.approx(first_period), pytest.approx(delay)]
    assert swarm.reads == 2 and swarm.moves == [(pytest.approx(first_period + delay), "a", Span(2, 4))]


def test_a_move_made_by_another_peer_during_the_delay_cancels_this_one():
    async def scenario():
        clock = VirtualClock()
        swarm = FakeSwarm(clock, 4, *crowded())
        r = swarm.rebalancer("a", seed=1)
        checking = asyncio.create_task(r.check())
        await _settle()  # a decided to move and now waits its delay; meanwhile b moves to 2:4
        assert clock.sleeps and swarm.reads == 1
        swarm.views["b"] = view("b", 0, 2, DRAINING, next_span=Span(2, 4))
        await clock.advance(10.0)
        assert await checking is None

    asyncio.run(scenario())


def test_records_a_read_missed_do_not_make_a_move():
    """a, b, c on 0:2 and d, e on 2:4: no move helps. The first read misses d and the second e (a DHT read
    may come back without some records); each alone says 2:4 is weak, the two together say it is not."""
    async def scenario():
        clock = VirtualClock()
        swarm = FakeSwarm(clock, 4, view("a", 0, 2), view("b", 0, 2), view("c", 0, 2), view("d", 2, 4),
                          view("e", 2, 4))
        missed = iter(["d", "e"])

        async def partial_read() -> SwarmSnapshot:
            return (await swarm.read()).without(next(missed))

        r = swarm.rebalancer("a", seed=1)
        r._read = partial_read
        checking = asyncio.create_task(r.check())
        await _settle()
        assert swarm.reads == 1 and clock.sleeps  # the first read alone said to move
        await clock.advance(10.0)
        assert await checking is None and swarm.reads == 2

    asyncio.run(scenario())


def test_a_peer_that_is_not_online_does_not_move():
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 4, view("a", 0, 2, JOINING), view("b", 0, 2), view("c", 0, 2), view("d", 2, 4))
    run_for(clock, [swarm.rebalancer("a", seed=3)], seconds=10 * 60)
    assert swarm.moves == []


def test_a_failed_move_ends_the_loop_and_says_why():
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 4, *crowded())
    reasons: list[str] = []

    async def failing_move(target: Span) -> None:
        raise OSError("disk gone")

    r = swarm.rebalancer("a", seed=2)
    r._move, r._on_fatal = failing_move, reasons.append
    run_for(clock, [r], seconds=10 * 60)
    assert reasons == ["moving to blocks 2:4 failed: disk gone"] and r.moves == 0


def test_a_failed_read_skips_one_check():
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 4, *crowded())
    real_read, calls = swarm.read, []

    async def flaky_read():
        calls.append(clock.now)
        if len(calls) == 1:
            raise TimeoutError("DHT lookup timed out")
        return await real_read()

    r = swarm.rebalancer("a", seed=4)
    r._read = flaky_read
    run_for(clock, [r], seconds=3 * 60)
    assert len(swarm.moves) == 1 and swarm.moves[0][0] > 60 * 0.75 * 2  # the second period's check moved


# ---------------------------------------------------------------- a crowd on the virtual clock


def joined_crowd(rng: random.Random, num_blocks: int, count: int) -> list[PeerView]:
    """`count` peers of random speed and span length, joined one after another where the swarm was weakest."""
    peers: list[PeerView] = []
    for i in range(count):
        length = rng.randint(2, 6)
        cover = coverage(SwarmSnapshot(num_blocks, tuple(peers)))
        span = choose_span(cover, length)
        peers.append(view(f"p{i:02d}", span.start, span.end, tokens_s=rng.uniform(10, 1000) / length))
    return peers


def settled_quality(swarm: FakeSwarm):
    return quality(coverage(SwarmSnapshot(swarm.num_blocks, tuple(swarm.views.values()))))


@pytest.mark.parametrize("seed", range(3))
def test_a_crowd_settles_and_heals_without_flapping(seed):
    """40 peers on 16 blocks: rebalancing only ever improves the swarm, stops moving within minutes, and
    after a fifth of the peers die at once the survivors cover every block again."""
    rng = random.Random(seed)
    clock = VirtualClock()
    swarm = FakeSwarm(clock, 16, *joined_crowd(rng, 16, 40))
    start = settled_quality(swarm)
    rebalancers = {p: swarm.rebalancer(p, seed * 100 + i) for i, p in enumerate(swarm.views)}
    run_for(clock, list(rebalancers.values()), seconds=30 * 60)
    settled = settled_quality(swarm)
    assert settled >= start
    assert all(t < 20 * 60 for t, _, _ in swarm.moves), swarm.moves  # quiet for the last 10 minutes
    moves_before = len(swarm.moves)

    for peer_id in rng.sample(sorted(swarm.views), 8):  # kill -9: their records are gone
        del swarm.views[peer_id]
        del rebalancers[peer_id]
    clock2 = VirtualClock()
    swarm.clock = clock2
    survivors = [swarm.rebalancer(p, seed * 1000 + i) for i, p in enumerate(swarm.views)]
    run_for(clock2, survivors, seconds=30 * 60)
    healed = settled_quality(swarm)
    assert healed.uncovered == 0, (healed, swarm.moves[moves_before:])
    assert all(t < 20 * 60 for t, _, _ in swarm.moves[moves_before:]), swarm.moves[moves_before:]
