"""The injected network, as data: one-way delays and bandwidth caps between hosts, seeded.

Hosts sit at random points of a unit square; the one-way delay between two of them grows with their
distance, from MIN_DELAY_S (same spot) to MAX_DELAY_S (opposite corners), so the delays obey the
triangle inequality as real ones roughly do. Each host has an access-link rate; a link between two
hosts runs at the slower of the two. Pure functions, no I/O: the relay and the offline route
evaluation read the same `Links`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass

MIN_DELAY_S = 0.020
MAX_DELAY_S = 0.100


@dataclass(frozen=True)
class Links:
    """points[i] = (x, y) of host i; rates_bytes_s[i] = its access-link rate."""

    points: tuple[tuple[float, float], ...]
    rates_bytes_s: tuple[float, ...]

    def delay_s(self, src: int, dst: int) -> float:
        """One-way delay from host src to host dst (symmetric)."""
        (x1, y1), (x2, y2) = self.points[src], self.points[dst]
        return MIN_DELAY_S + (MAX_DELAY_S - MIN_DELAY_S) * math.hypot(x1 - x2, y1 - y2) / math.sqrt(2)

    def rate_bytes_s(self, src: int, dst: int) -> float:
        return min(self.rates_bytes_s[src], self.rates_bytes_s[dst])

    def rtt_s(self, a: int, b: int) -> float:
        return self.delay_s(a, b) + self.delay_s(b, a)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Links:
        raw = json.loads(text)
        return cls(tuple(tuple(p) for p in raw["points"]), tuple(raw["rates_bytes_s"]))


def make_links(num_hosts: int, seed: int, min_mbit_s: float = 10.0, max_mbit_s: float = 100.0,
               near: dict[int, tuple[float, float]] | None = None) -> Links:
    """Seeded random placement and access rates (uniform in [min, max] Mbit/s); `near` pins hosts to points."""
    rng = random.Random(seed)
    points = [(rng.random(), rng.random()) for _ in range(num_hosts)]
    for host, point in (near or {}).items():
        points[host] = point
    rates = [rng.uniform(min_mbit_s, max_mbit_s) * 1e6 / 8 for _ in range(num_hosts)]
    return Links(tuple(points), tuple(rates))


def delay_range_s(links: Links) -> tuple[float, float]:
    n = len(links.points)
    values = [links.delay_s(a, b) for a in range(n) for b in range(n) if a != b]
    return min(values), max(values)


def with_points(links: Links, points: dict[int, tuple[float, float]]) -> Links:
    """The same links with some hosts moved to given points (e.g. a new peer next to a client)."""
    moved = list(links.points)
    for host, point in points.items():
        moved[host] = point
    return Links(tuple(moved), links.rates_bytes_s)
