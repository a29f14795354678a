"""HealthConfig: the health monitor's settings, validated once; `swarm health` builds its flags from it."""

from __future__ import annotations

from dataclasses import dataclass

from bootstrap.health.publish import PUBLISH_MODES
from swarm.errors import ConfigError
from swarm.swarmkey import SwarmKey


@dataclass(frozen=True)
class HealthConfig:
    host: str = "127.0.0.1"  # HTTP listen address (0.0.0.0 to publish the page)
    port: int = 8090  # HTTP port (0 = any free port; HealthServer.url tells which)
    refresh_s: float = 10.0  # one crawl (DHT + probes) starts every refresh_s
    dht_timeout_s: float = 5.0  # bound on each DHT read of a crawl
    probe_timeout_s: float = 3.0  # bound on each peer's `info` probe (connect included)
    max_concurrent_probes: int = 64
    max_models: int = 256  # crawl bounds: the index is open to anyone, so its claims are capped
    max_blocks_per_model: int = 4096  # (today's largest models have ~128 blocks)
    reachability_timeout_s: float = 5.0  # bound on one reachability check (dial + info)
    max_concurrent_reachability_checks: int = 4  # more at once get 429
    # By default a reachability check dials only the IP address the request came from, so the server
    # cannot be used to scan other hosts; turn off only on a trusted network (behind a proxy, say).
    reachability_same_ip_only: bool = True
    max_query_chars: int = 2048  # longer query strings get 414
    # a private swarm's key: the crawl and the reachability checks show it (swarm.admission)
    swarm_key: SwarmKey | None = None
    # the page flags a peer that at least this many distinct clients reported for wrong results
    # (bootstrap.health.reports)
    report_flag_reporters: int = 3
    publish: str | None = None  # full | summary | none (bootstrap.health.publish); None: full, or summary if private

    @property
    def publish_mode(self) -> str:
        return self.publish or ("summary" if self.swarm_key is not None else "full")

    def __post_init__(self) -> None:
        if self.publish is not None and self.publish not in PUBLISH_MODES:
            raise ConfigError(f"publish {self.publish!r}: expected one of {', '.join(PUBLISH_MODES)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"health port {self.port} is outside [0, 65535]")
        for name in ("refresh_s", "dht_timeout_s", "probe_timeout_s", "reachability_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"{name} must be in (0, 3600] seconds, got {value}")
        for name in (
            "max_concurrent_probes",
            "max_models",
            "max_blocks_per_model",
            "max_concurrent_reachability_checks",
            "max_query_chars",
            "report_flag_reporters",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
