"""ClientConfig: how a client finds and uses the swarm. One frozen object, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.errors import ConfigError

from client.routing import CostModel


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()
    model_id: str | None = None  # default: the checkpoint folder's name, as peers compute it
    wait_for_route_s: float = 30.0  # how long to wait for missing blocks to appear; 0 = fail at once
    connect_timeout_s: float = 20.0
    step_timeout_s: float = 120.0
    route_poll_s: float = 1.0
    ping_timeout_s: float = 2.0  # an info round trip measures each candidate's latency
    max_open_attempts: int = 5
    blocked_peers: tuple[str, ...] = ()  # peer ids never to route through (untrusted, or a test's choice)
    cost_model: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        for name in ("wait_for_route_s", "connect_timeout_s", "step_timeout_s", "route_poll_s", "ping_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
