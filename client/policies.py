"""Fault-tolerance policies for the client: who to avoid (BanList) and how long to keep trying (Retry).

Both are a frozen, validated config object plus a small state object with an injected clock
(`Callable[[], float]`, seconds, monotonic), so they are pure apart from that clock and can be tested
with a fake one. Neither sleeps, logs or touches the network: the caller asks, then acts.

    bans = BanList(BanPolicy(), clock)                 retry = RetryPolicy(...).start(clock)
    try: step through hop i                            while True:
    except Exception as e:                                 try: return plan_route(...)
        peer = blame(hop_i.peer_id, e)                     except MissingBlocksError:
        if peer: bans.ban(peer, str(e))                        delay = retry.next_delay()
        ...                                                    if delay is None: raise
    else: bans.clear(hop_i.peer_id)                            await asyncio.sleep(delay)

Not thread-safe: one event loop owns each object.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from swarm.errors import ConfigError, PeerError, VersionMismatch

Clock = Callable[[], float]


def _finite_at_least(name: str, value: float, low: float) -> None:
    # `not (value >= low)` also rejects NaN; bool is an int, but never a duration.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Ban list


@dataclass(frozen=True)
class BanPolicy:
    """How long a failed peer is avoided.

    The n-th consecutive failure of one peer bans it for min(cap_s, base_s * 2 ** (n - 1)) seconds:
    30, 60, 120, ... 600 s with the defaults (longer than a dead peer's
    DHT record lives, so recovery does not pick it again). Raises ConfigError unless 0 < base_s <= cap_s < inf.
    """

    base_s: float = 30.0
    cap_s: float = 600.0

    def __post_init__(self) -> None:
        _finite_at_least("BanPolicy.base_s", self.base_s, 0.0)
        if self.base_s == 0:
            raise ConfigError("BanPolicy.base_s must be > 0 (a zero ban keeps no failed peer out of a route)")
        _finite_at_least("BanPolicy.cap_s", self.cap_s, self.base_s)

    def duration_s(self, failures: int) -> float:
        """Ban length after `failures` (>= 1) consecutive failures."""
        # Clamp the exponent: 2.0 ** 1100 overflows, and the cap is reached long before 64 doublings.
        return min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 64))


@dataclass
class _Entry:
    failures: int  # consecutive failures since the last success (clear)
    until: float  # clock time at which the current (or last) ban lifts
    reason: str


class BanList:
    """Peers to keep out of routes for a while, each with its own exponential backoff.

    Contract: the list bans only the peer it is told to ban; it never infers blame. The caller names
    the peer that failed (see `blame`): a step timeout on hop i bans hop i's peer, never its
    neighbours, and one peer's failure or success never changes another peer's ban or count.

    State: per peer, a consecutive-failure count, a ban expiry time and a reason. Counts survive ban
    expiry (so a peer that keeps failing is kept out longer each time) and are reset only by
    `clear`. Mutated by `ban` and `clear` only; queries read the clock and mutate nothing.
    Raises nothing beyond the ConfigError of BanPolicy.
    """

    def __init__(self, policy: BanPolicy | None = None, clock: Clock = time.monotonic):
        self.policy = policy if policy is not None else BanPolicy()
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def ban(self, peer_id: str, reason: str) -> float:
        """Record a failure of `peer_id` and ban it; returns the seconds until its ban lifts.

        A failure reported while the peer is already banned does not lengthen the ban or count
        again: it comes from a request that started before the ban (several sessions often see one
        crash at once), so it is no new evidence. The first reason of a ban is kept.
        """
        now = self.clock()
        entry = self._entries.get(peer_id)
        if entry is not None and now < entry.until:
            return entry.until - now
        failures = 1 if entry is None else entry.failures + 1
        duration = self.policy.duration_s(failures)
        self._entries[peer_id] = _Entry(failures, now + duration, reason)
        return duration

    def clear(self, peer_id: str) -> None:
        """Record a success of `peer_id`: forget its failures and lift any ban. Unknown peers are fine."""
        self._entries.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        entry = self._entries.get(peer_id)
        return entry is not None and self.clock() < entry.until

    def banned(self) -> frozenset[str]:
        """The peers banned now (pass it to plan_route's `banned`)."""
        now = self.clock()
        return frozenset(p for p, e in self._entries.items() if now < e.until)

    def reason(self, peer_id: str) -> str | None:
        """Why `peer_id` is banned now, or None if it is not banned."""
        return self._entries[peer_id].reason if self.is_banned(peer_id) else None

    def remaining_s(self, peer_id: str) -> float:
        """Seconds until `peer_id`'s ban lifts; 0.0 if it is not banned."""
        entry = self._entries.get(peer_id)
        return max(0.0, entry.until - self.clock()) if entry is not None else 0.0

    def failures(self, peer_id: str) -> int:
        """Consecutive failures of `peer_id` since its last success (0 if none)."""
        entry = self._entries.get(peer_id)
        return entry.failures if entry is not None else 0


def blame(failed_hop_peer: str, error: BaseException) -> str | None:
    """Which peer to ban for `error`, raised while talking to the hop served by `failed_hop_peer`.

    - PeerError (incl. PeerRefused): the peer the error names (it is built where the exchange with
      that peer failed), else `failed_hop_peer`. A refusal is on purpose (limits, draining), but
      retrying that peer at once would not help either, so it is banned like a failure.
    - VersionMismatch: `failed_hop_peer`, which speaks another protocol version.
    - TimeoutError, ConnectionError, EOFError (asyncio's IncompleteReadError): `failed_hop_peer`;
      network failures that reached the caller without being wrapped in a PeerError.
    - Anything else, None: the client's own error (SessionError, ConfigError, RoutingError, a
      ProtocolError raised by the client's encoder, a bug, cancellation). Banning a peer for it
      would punish a healthy peer. So a peer's malformed reply must reach here as a PeerError, as
      the client's reply decoders already wrap it; a bare ProtocolError is taken as local.
    """
    if isinstance(error, PeerError):
        return error.peer or failed_hop_peer
    if isinstance(error, VersionMismatch | TimeoutError | ConnectionError | EOFError):
        return failed_hop_peer
    return None


# ---------------------------------------------------------------------------------------------------
# Retry schedule


@dataclass(frozen=True)
class RetryPolicy:
    """A bounded retry schedule: at most `max_attempts` attempts, all within `deadline_s` of the start.

    The delay before attempt k + 1 is min(backoff_cap_s, backoff_base_s * 2 ** (k - 1)), then, if
    jitter_frac > 0, scaled by a uniform factor in [1 - jitter_frac, 1] (so jitter only shortens),
    then cut to the time left before the deadline, so the last attempt runs at the deadline at the
    latest. `max_attempts=None` bounds by the deadline alone, `deadline_s=None` by attempts alone;
    one of them must be set, so a schedule never retries forever.

    Waiting for a route (DESIGN.md section 3): RetryPolicy(max_attempts=None,
    deadline_s=config.wait_for_route_s, backoff_base_s=config.route_poll_s, backoff_cap_s=...); with
    deadline_s=0 the first miss gives up at once, and the caller re-raises its MissingBlocksError.

    Raises ConfigError on a bound or duration that is missing, negative, NaN or infinite.
    """

    max_attempts: int | None = 5
    deadline_s: float | None = 30.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0
    jitter_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.max_attempts is None and self.deadline_s is None:
            raise ConfigError("RetryPolicy needs max_attempts or deadline_s (or both), or it never gives up")
        n = self.max_attempts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"RetryPolicy.max_attempts must be an int >= 1 or None, got {n!r}")
        if self.deadline_s is not None:
            _finite_at_least("RetryPolicy.deadline_s", self.deadline_s, 0.0)
        _finite_at_least("RetryPolicy.backoff_base_s", self.backoff_base_s, 0.0)
        _finite_at_least("RetryPolicy.backoff_cap_s", self.backoff_cap_s, self.backoff_base_s)
        if self.max_attempts is None and self.backoff_base_s == 0:
            raise ConfigError("RetryPolicy: max_attempts=None needs backoff_base_s > 0, else it busy-waits")
        _finite_at_least("RetryPolicy.jitter_frac", self.jitter_frac, 0.0)
        if self.jitter_frac > 1:
            raise ConfigError(f"RetryPolicy.jitter_frac must be in [0, 1], got {self.jitter_frac!r}")

    def start(self, clock: Clock = time.monotonic, rng: random.Random | None = None) -> Retry:
        """Begin a schedule now (the first attempt is under way). `rng` draws the jitter; a fresh,
        unseeded one is used if jitter_frac > 0 and none is given."""
        if rng is None and self.jitter_frac > 0:
            rng = random.Random()
        return Retry(self, clock, rng)


class Retry:
    """One run of a RetryPolicy. Create it with `policy.start(clock)`.

    `attempt` is the number of the attempt under way: 1 before any `next_delay` call. Only
    `next_delay` mutates (attempt count, rng state); it raises nothing.
    """

    def __init__(self, policy: RetryPolicy, clock: Clock, rng: random.Random | None):
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.started = clock()
        self.attempt = 1
        self.gave_up = False

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def remaining_s(self) -> float:
        """Seconds left before the deadline (never negative); math.inf without a deadline."""
        if self.policy.deadline_s is None:
            return math.inf
        return max(0.0, self.policy.deadline_s - self.elapsed_s())

    def next_delay(self) -> float | None:
        """After attempt `attempt` failed: seconds to wait before the next one, or None to give up.

        None when `max_attempts` attempts have been made or no time is left before the deadline, and
        from then on. Otherwise counts the next attempt and returns a delay in
        [0, min(backoff_cap_s, remaining_s())].
        """
        p = self.policy
        remaining = self.remaining_s()
        if self.gave_up or (p.max_attempts is not None and self.attempt >= p.max_attempts) or remaining <= 0:
            self.gave_up = True
            return None
        delay = min(p.backoff_cap_s, p.backoff_base_s * 2.0 ** min(self.attempt - 1, 64))
        if self.rng is not None and p.jitter_frac > 0:
            delay *= 1.0 - p.jitter_frac * self.rng.random()
        self.attempt += 1
        return min(delay, remaining)
