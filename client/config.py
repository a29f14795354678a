"""ClientConfig: how a client finds and uses the swarm. One frozen object, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from client.policies import BanPolicy, RetryPolicy
from client.routing import MIN_PRECISIONS, CostModel
from client.verify import Tolerances
from swarm.errors import ConfigError
from swarm.lite import BACKENDS
from swarm.swarmkey import SwarmKey

# per block on a peer below full precision, with prefer_full_precision: far above any step's compute and
# latency terms, below the short-cache penalty (a full cache still outweighs precision)
PREFER_FULL_PENALTY_S = 1.0


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
    # the network backend (client.transport.make_transport): "hivemind" (p2pd), "lite" (py-libp2p, no
    # hivemind: swarm-llm[lite]), "auto" = hivemind where it is installed, else lite
    transport: str = "auto"
    route_poll_s: float = 1.0
    ping_timeout_s: float = 2.0  # an info round trip measures each candidate's latency
    # a new session plans on a DHT snapshot at most this old: a peer that joins gets sessions this soon
    snapshot_max_age_s: float = 10.0
    blocked_peers: tuple[str, ...] = ()  # peer ids never to route through (untrusted, or a test's choice)
    # precision of the spans a route may use (client.routing.MIN_PRECISIONS): "any" accepts quantized peers
    # (nf4, int8, fp8 weights, fp8 KV caches), "8bit" leaves out 4-bit ones, "full" takes only unquantized
    # 16/32-bit spans (what must match local transformers exactly)
    min_precision: str = "any"
    prefer_full_precision: bool = False  # route quantized peers only where no full-precision peer serves
    cost_model: CostModel = field(default_factory=CostModel)
    ban_policy: BanPolicy = field(default_factory=BanPolicy)
    recovery_policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=8, deadline_s=120.0, backoff_base_s=0.1, backoff_cap_s=5.0)
    )
    # checks of peers' results (client.verify): each step of each hop is also run on a second peer with this
    # probability, and always for a peer this client has not verified yet; outputs are compared within
    # verify_tolerances; a peer the third outvotes is banned for good and reported. 0 = no checks
    verify_probability: float = 0.05
    verify_seed: int | None = None  # seeds the check draws (tests, benchmarks); None = unpredictable
    verify_tolerances: Tolerances = field(default_factory=Tolerances)
    verify_max_rewinds: int = 8  # a call caught on wrong results more often than this gives up
    # before a generate call returns its unchecked outputs are checked; a check not done within this (a shadow
    # on a hung peer) is left running, and what it finds applies at the session's next step
    verify_settle_timeout_s: float = 10.0
    report_wrong_results: bool = True  # publish a signed report record of each peer this client convicts
    max_reports_per_hour: int = 10
    # a step of more tokens than this (a prompt) through several hops goes as a pipeline of steps of this
    # many: all sent to the first hop at once, each pushed on as soon as it is done, so hop i works on one
    # part while hop i + 1 works on the one before (InferenceSession._pipelined); 0 = one step
    pipeline_chunk_tokens: int = 512
    replay_chunk_tokens: int = 1024  # kept inputs are replayed to a replacement in steps of this many tokens
    max_kept_bytes: int = 4 << 30  # bound on the inputs a session keeps for recovery (checked when it starts)

    @property
    def route_wait_policy(self) -> RetryPolicy:
        """Waiting for missing blocks: poll every route_poll_s until wait_for_route_s, then give up."""
        return RetryPolicy(max_attempts=None, deadline_s=self.wait_for_route_s,
                           backoff_base_s=self.route_poll_s, backoff_cap_s=self.route_poll_s)

    @property
    def min_precision_bits(self) -> int:
        return MIN_PRECISIONS[self.min_precision]

    @property
    def route_cost_model(self) -> CostModel:
        """The cost model routes are planned with: `cost_model`, with a 1 s penalty per block run below full
        precision when `prefer_full_precision` asks for it (and the cost model sets none of its own)."""
        if self.prefer_full_precision and not self.cost_model.low_precision_block_penalty_s:
            return dataclasses.replace(self.cost_model, low_precision_block_penalty_s=PREFER_FULL_PENALTY_S)
        return self.cost_model

    def __post_init__(self) -> None:
        if self.transport not in BACKENDS:
            raise ConfigError(f"transport={self.transport!r}: expected one of {', '.join(BACKENDS)}")
        if self.min_precision not in MIN_PRECISIONS:
            raise ConfigError(f"min_precision {self.min_precision!r}: use one of {', '.join(MIN_PRECISIONS)}")
        if not (isinstance(self.verify_probability, int | float) and 0 <= self.verify_probability <= 1):
            raise ConfigError(f"verify_probability={self.verify_probability!r}: must be in [0, 1] "
                              "(0 = no checks)")
        if self.verify_max_rewinds < 0 or self.max_reports_per_hour < 0:
            raise ConfigError("verify_max_rewinds and max_reports_per_hour must be >= 0")
        for name in ("wait_for_route_s", "connect_timeout_s", "step_timeout_s", "route_poll_s", "ping_timeout_s",
                     "forward_wait_s", "snapshot_max_age_s", "verify_settle_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
