"""Pure tests of the client's fault-tolerance policies (client/policies.py), on a fake clock."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from client.policies import BanList, BanPolicy, RetryPolicy, blame
from swarm.errors import (
    ConfigError,
    MissingBlocksError,
    PeerError,
    PeerRefused,
    ProtocolError,
    SessionError,
    VersionMismatch,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- BanList ---------------------------------------------------------------------------------------


def fail_and_expire(bans: BanList, clock: FakeClock, peer: str, times: int) -> list[float]:
    """Ban `peer` `times` times, letting each ban expire; returns the ban durations."""
    durations = []
    for _ in range(times):
        durations.append(bans.ban(peer, "timeout"))
        clock.advance(durations[-1])
    return durations


def test_ban_backoff_doubles_per_consecutive_failure_up_to_the_cap(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=60), clock)
    assert fail_and_expire(bans, clock, "A", 6) == [5, 10, 20, 40, 60, 60]
    assert bans.failures("A") == 6


def test_default_policy_is_30_s_doubling_to_600_s(clock):
    bans = BanList(clock=clock)
    durations = fail_and_expire(bans, clock, "A", 9)
    assert durations[:3] == [30, 60, 120]
    assert durations[-1] == 600 and max(durations) == 600


def test_huge_failure_counts_stay_at_the_cap():
    assert BanPolicy(base_s=1, cap_s=7).duration_s(5000) == 7


def test_ban_expires_exactly_after_its_duration(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    bans.ban("A", "crashed")
    clock.advance(4.999)
    assert bans.is_banned("A") and bans.banned() == {"A"}
    assert bans.remaining_s("A") == pytest.approx(0.001)
    clock.advance(0.001)
    assert not bans.is_banned("A")
    assert bans.banned() == frozenset()
    assert bans.reason("A") is None
    assert bans.remaining_s("A") == 0.0


def test_failure_while_banned_neither_extends_nor_escalates(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    bans.ban("A", "first")
    clock.advance(3)
    assert bans.ban("A", "second") == pytest.approx(2)  # the running ban, not a new 10 s one
    assert bans.failures("A") == 1 and bans.reason("A") == "first"
    clock.advance(2)
    assert not bans.is_banned("A")
    assert bans.ban("A", "third") == 10  # the next real failure doubles once


def test_banning_one_peer_leaves_others_alone(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    fail_and_expire(bans, clock, "A", 3)
    bans.ban("A", "timeout on hop 1")
    assert bans.is_banned("A")
    assert not bans.is_banned("B")
    assert bans.failures("B") == 0
    assert bans.ban("B", "refused") == 5  # B's first failure, whatever A's history
    assert bans.banned() == {"A", "B"}


def test_success_clears_only_that_peer(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    fail_and_expire(bans, clock, "A", 2)
    bans.ban("A", "timeout")
    bans.ban("B", "timeout")
    bans.clear("B")
    assert not bans.is_banned("B") and bans.failures("B") == 0
    assert bans.is_banned("A") and bans.failures("A") == 3
    assert bans.reason("A") == "timeout"


def test_clear_resets_the_backoff(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    fail_and_expire(bans, clock, "A", 3)  # 5, 10, 20
    bans.clear("A")
    assert bans.ban("A", "again") == 5
    bans.clear("A")  # a success lifts a running ban too
    assert not bans.is_banned("A")
    bans.clear("never-seen")  # no error


def test_failure_count_survives_expiry(clock):
    bans = BanList(BanPolicy(base_s=5, cap_s=300), clock)
    bans.ban("A", "x")
    clock.advance(1000)
    assert bans.ban("A", "y") == 10


def test_reason_reports_the_current_ban(clock):
    bans = BanList(BanPolicy(), clock)
    assert bans.reason("A") is None
    bans.ban("A", "no reply within 120 s")
    assert bans.reason("A") == "no reply within 120 s"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": 0},
        {"base_s": -1},
        {"base_s": math.nan},
        {"base_s": math.inf, "cap_s": math.inf},
        {"base_s": 10, "cap_s": 5},
        {"cap_s": math.inf},
        {"base_s": "5"},
        {"base_s": True},
    ],
)
def test_ban_policy_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        BanPolicy(**kwargs)


def test_ban_policy_accepts_equal_base_and_cap():
    assert BanPolicy(base_s=2, cap_s=2).duration_s(3) == 2


# --- blame -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, expected",
    [
        (PeerError("no reply within 120 s", peer="P"), "P"),
        (PeerError("stream closed"), "HOP"),  # no peer named: the hop the caller was talking to
        (PeerRefused("draining", peer="P"), "P"),
        (VersionMismatch("peer HOP does not speak swarm.v1.inference"), "HOP"),
        (TimeoutError(), "HOP"),
        (ConnectionResetError(), "HOP"),
        (asyncio.IncompleteReadError(b"", 8), "HOP"),
        (SessionError("max_length reached"), None),
        (ProtocolError("dtype torch.complex64 cannot travel on the wire"), None),
        (MissingBlocksError("m", [3]), None),
        (ConfigError("bad"), None),
        (RuntimeError("client bug"), None),
        (asyncio.CancelledError(), None),
    ],
)
def test_blame(error, expected):
    assert blame("HOP", error) == expected


def test_blame_feeds_ban_list_for_the_failed_hop_only(clock):
    route = ["A", "B", "C"]
    bans = BanList(BanPolicy(), clock)
    error = PeerError("no reply within 120 s", peer="B")  # step timeout on hop 1
    culprit = blame(route[1], error)
    assert culprit is not None
    bans.ban(culprit, str(error))
    assert bans.banned() == {"B"}
    assert blame(route[2], SessionError("closed")) is None


# --- RetryPolicy -----------------------------------------------------------------------------------


def drain(retry, clock: FakeClock) -> list[float]:
    """Fail every attempt, sleeping each delay on the fake clock; returns the delays until give-up."""
    delays = []
    while (delay := retry.next_delay()) is not None:
        delays.append(delay)
        clock.advance(delay)
        assert len(delays) < 1000, "schedule never gave up"
    return delays


def test_retry_gives_up_at_max_attempts(clock):
    policy = RetryPolicy(max_attempts=4, deadline_s=None, backoff_base_s=1, backoff_cap_s=100)
    retry = policy.start(clock)
    assert retry.attempt == 1
    assert drain(retry, clock) == [1, 2, 4]
    assert retry.attempt == 4
    assert retry.next_delay() is None  # stays given up
    assert retry.attempt == 4


def test_retry_gives_up_at_the_deadline_before_max_attempts(clock):
    policy = RetryPolicy(max_attempts=100, deadline_s=10, backoff_base_s=1, backoff_cap_s=100)
    retry = policy.start(clock)
    delays = drain(retry, clock)
    assert delays == [1, 2, 4, 3]  # the last wait is cut so the final attempt runs at the deadline
    assert retry.attempt == 5
    assert retry.elapsed_s() == pytest.approx(10)
    assert retry.remaining_s() == 0


def test_retry_gives_up_at_max_attempts_before_the_deadline(clock):
    retry = RetryPolicy(max_attempts=2, deadline_s=1000, backoff_base_s=1, backoff_cap_s=1).start(clock)
    assert drain(retry, clock) == [1]
    assert retry.remaining_s() == pytest.approx(999)


def test_deadline_counts_time_spent_in_attempts(clock):
    retry = RetryPolicy(max_attempts=None, deadline_s=10, backoff_base_s=1, backoff_cap_s=1).start(clock)
    clock.advance(9.5)  # a slow first attempt
    assert retry.next_delay() == pytest.approx(0.5)
    clock.advance(0.5)
    assert retry.next_delay() is None


def test_zero_deadline_fails_at_once(clock):
    retry = RetryPolicy(max_attempts=None, deadline_s=0, backoff_base_s=1, backoff_cap_s=1).start(clock)
    assert retry.next_delay() is None
    assert retry.attempt == 1


def test_delays_never_exceed_cap_or_remaining_time(clock):
    policy = RetryPolicy(
        max_attempts=50, deadline_s=100, backoff_base_s=0.5, backoff_cap_s=8, jitter_frac=0.5
    )
    retry = policy.start(clock, random.Random(1))
    while True:
        remaining = retry.remaining_s()
        delay = retry.next_delay()
        if delay is None:
            break
        assert 0 <= delay <= min(8, remaining)
        clock.advance(delay)
    assert retry.elapsed_s() <= 100


def test_max_attempts_one_never_retries(clock):
    assert RetryPolicy(max_attempts=1, deadline_s=None).start(clock).next_delay() is None


def test_jitter_is_reproducible_with_a_seeded_random(clock):
    policy = RetryPolicy(
        max_attempts=8, deadline_s=None, backoff_base_s=1, backoff_cap_s=1000, jitter_frac=0.5
    )
    first = drain(policy.start(clock, random.Random(42)), clock)
    second = drain(policy.start(clock, random.Random(42)), clock)
    other = drain(policy.start(clock, random.Random(7)), clock)
    assert first == second
    assert first != other
    unjittered = [1, 2, 4, 8, 16, 32, 64]
    assert len(first) == len(unjittered)
    for delay, full in zip(first, unjittered, strict=True):
        assert full * 0.5 <= delay <= full  # jitter only shortens, by at most jitter_frac


def test_no_jitter_ignores_the_random(clock):
    policy = RetryPolicy(max_attempts=4, deadline_s=None, backoff_base_s=1, backoff_cap_s=10)
    rng = random.Random(0)
    state = rng.getstate()
    assert drain(policy.start(clock, rng), clock) == [1, 2, 4]
    assert rng.getstate() == state


def test_route_wait_shape(clock):
    """No route: poll until the deadline, then the caller re-raises MissingBlocksError; never forever."""
    policy = RetryPolicy(max_attempts=None, deadline_s=30, backoff_base_s=1, backoff_cap_s=5)
    retry = policy.start(clock)
    polls = 0

    def plan():
        nonlocal polls
        polls += 1
        raise MissingBlocksError("tiny", [2, 3])

    with pytest.raises(MissingBlocksError, match="2:4"):
        while True:
            try:
                plan()
            except MissingBlocksError:
                delay = retry.next_delay()
                if delay is None:
                    raise
                clock.advance(delay)
    assert retry.elapsed_s() == pytest.approx(30)
    assert polls == retry.attempt == 9  # t = 0, 1, 3, 7, 12, 17, 22, 27, 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": None, "deadline_s": None},
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"max_attempts": True},
        {"deadline_s": -1},
        {"deadline_s": math.nan},
        {"deadline_s": math.inf},
        {"backoff_base_s": -0.1},
        {"backoff_base_s": 2, "backoff_cap_s": 1},
        {"backoff_cap_s": math.inf},
        {"jitter_frac": -0.1},
        {"jitter_frac": 1.5},
        {"max_attempts": None, "deadline_s": 10, "backoff_base_s": 0, "backoff_cap_s": 0},
    ],
)
def test_retry_policy_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_retry_policy_defaults_are_valid_and_bounded(clock):
    policy = RetryPolicy()
    assert policy.max_attempts is not None and policy.deadline_s is not None
    assert len(drain(policy.start(clock), clock)) == policy.max_attempts - 1
