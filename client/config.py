"""ClientConfig: how a client finds and uses the swarm. One frozen object, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from client.policies import BanPolicy, RetryPolicy
from client.routing import CostModel
from swarm.errors import ConfigError
from swarm.swarmkey import SwarmKey


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm.admission, swarm.swarmkey); None = public
    model_id: str | None = None  # default: the checkpoint folder's name, as peers compute it
    wait_for_route_s: float = 30.0  # how long to wait for missing blocks to appear; 0 = fail at once
    connect_timeout_s: float = 20.0
    step_timeout_s: float = 30.0  # a step with no answer after this (plus the per-token part) fails over
    step_timeout_per_token_s: float = 0.05  # prefill of a long prompt gets more time
    # server-to-server steps: each peer pushes its output straight to the next hop of the route; a hop
    # whose pushed step has not answered within forward_wait_s (plus the per-token part) gets it from us
    server_to_server: bool = True
    forward_wait_s: float = 2.0
    direct: bool = True  # streams to peers' direct TLS ports where they announce one (else through p2pd)
    route_poll_s: float = 1.0
    ping_timeout_s: float = 2.0  # an info round trip measures each candidate's latency
    blocked_peers: tuple[str, ...] = ()  # peer ids never to route through (untrusted, or a test's choice)
    cost_model: CostModel = field(default_factory=CostModel)
    ban_policy: BanPolicy = field(default_factory=BanPolicy)
    recovery_policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=8, deadline_s=120.0, backoff_base_s=0.1, backoff_cap_s=5.0)
    )
    replay_chunk_tokens: int = 1024  # kept inputs are replayed to a replacement in steps of this many tokens
    max_kept_bytes: int = 4 << 30  # bound on the inputs a session keeps for recovery (checked when it starts)

    @property
    def route_wait_policy(self) -> RetryPolicy:
        """Waiting for missing blocks: poll every route_poll_s until wait_for_route_s, then give up."""
        return RetryPolicy(max_attempts=None, deadline_s=self.wait_for_route_s,
                           backoff_base_s=self.route_poll_s, backoff_cap_s=self.route_poll_s)

    def __post_init__(self) -> None:
        for name in ("wait_for_route_s", "connect_timeout_s", "step_timeout_s", "route_poll_s", "ping_timeout_s",
                     "forward_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
