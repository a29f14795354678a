"""PeerConfig: everything a volunteer server is told, validated once; the CLI builds its flags from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from swarm.errors import ConfigError
from swarm.spans import Span
from swarm.swarmkey import SwarmKey


@dataclass(frozen=True)
class PeerConfig:
    model_path: str
    span: Span | None = None  # None: chosen from the DHT on start (peer.placement)
    initial_peers: tuple[str, ...] = ()
    # how long to keep trying the initial peers at start: a busy bootstrap node or a slow link fails a try
    # now and then (each try ~6-8 s), and a volunteer's peer should not give up after the first few
    join_timeout_s: float = 90.0
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: tuple[str, ...] = ()
    direct_port: int | None = 0  # TCP port of direct TLS streams (swarm.direct); 0 = any free port, None = off
    identity_path: str | None = None
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm.admission); None = a public swarm
    model_id: str | None = None  # default: the checkpoint folder's name
    public_name: str = ""
    health_url: str | None = None  # the swarm's health page; the peer links to it and asks it for reachability
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    # lower precision and offloading (swarm.runtime.quant, swarm.runtime.offload), announced in the record
    quant: str = "none"  # weights of the blocks' linear layers: none, int8, fp8 or nf4 (torchao)
    kv_dtype: str = "auto"  # KV cache pages: auto (the dtype) or fp8
    offload_blocks: int = 0  # the span's last N blocks keep their weights in host RAM, streamed in per forward
    kv_offload: bool = False  # the KV cache lives in host RAM (a longer context than the device holds)
    attn_implementation: str = "sdpa"
    progress: bool = False  # progress bars while loading (the CLI turns them on)
    num_threads: int | None = None  # torch CPU threads; None = torch's default (all cores)
    # limits, enforced and announced in `info`
    cache_tokens: int = 65536  # KV budget, counted in cached tokens x rows over the whole span
    cache_bytes: int | str | None = None  # KV budget in bytes (overrides cache_tokens); "auto" = most of free memory
    page_tokens: int = 16  # KV memory is handed out in pages of this many token slots per row
    admission_timeout_s: float = 10.0  # a new session waits this long for KV memory, then is refused (and a
    # step this long for device memory, then fails its session: the client moves it)
    # continuous batching (peer.scheduler)
    max_batch_tokens: int = 2048  # token rows per batched forward
    prefill_chunk_tokens: int = 512  # a prompt runs in chunks of at most this many tokens per forward
    # decode steps wait up to this long for the steps of the peer's other recently active sessions, so
    # they share one forward, and stop waiting once no step came for an eighth of it (None: 40 ms on
    # CUDA, where a forward costs about the same for 1 or 64 sessions; 0 on the CPU, where it costs in
    # proportion)
    batch_wait_ms: float | None = None
    cuda_graphs: bool = True  # batched decode steps replay CUDA graphs (swarm.runtime.graphs); CUDA only
    max_tokens_per_step: int = 4096
    max_session_length_tokens: int = 8192
    max_batch_size: int = 64
    max_sessions_per_client: int = 32
    max_message_bytes: int = 64 * 1024 * 1024
    # timings
    session_idle_timeout_s: float = 300.0
    open_timeout_s: float = 30.0
    forward_timeout_s: float = 2.0  # pushing a step to the next peer: connect and write, else the client sends it
    announce_period_s: float = 10.0
    record_ttl_s: float = 40.0
    # leaving (peer.drain): SIGTERM or a notice starts draining; the peer leaves when its last session
    # closes or drain_grace_s passes, whichever comes first
    drain_grace_s: float = 30.0
    drain_notice_file: str | None = None  # a file whose appearance is the notice (spot-instance agents)
    drain_notice_url: str | None = None  # GET: 200 + body = notice, 404 = none (AWS spot/instance-action)
    drain_notice_file_period_s: float = 1.0
    drain_notice_url_period_s: float = 5.0
    drain_notice_url_timeout_s: float = 2.0
    # block selection and rebalancing (peer.placement, peer.rebalance), used only when no span is given
    num_blocks: int | None = None  # how many blocks to take; None = as many as memory_bytes allows
    memory_bytes: int | None = None  # memory for weights + KV cache + activations; None = what the device has free
    join_jitter_s: float = 2.0  # after announcing its first choice, a random wait in [jitter/2, jitter] then a re-read
    rebalance_period_s: float = 120.0  # how often to check whether moving helps the swarm; 0 = never move
    rebalance_margin: float = 0.2  # move only if the minimum coverage rises by more than this fraction
    rebalance_delay_s: float = 10.0  # a random wait in [0, this] between deciding to move and the re-check
    # throughput (peer.throughput) and network figures (peer.network)
    throughput_cache: str | None = None  # JSON file; None = $SWARM_CACHE_DIR or ~/.cache/swarm/throughput.json
    remeasure_throughput: bool = False  # measure again even when the cache has a figure
    network_probe_period_s: float = 30.0  # how often to ping the peers next to this one; 0 = never
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.cache_bytes, str) and self.cache_bytes != "auto" or (
            isinstance(self.cache_bytes, int) and self.cache_bytes < 0
        ):
            raise ConfigError(f"cache bytes {self.cache_bytes!r}: expected a size in bytes or 'auto'")
        for name in ("page_tokens", "max_batch_tokens", "prefill_chunk_tokens", "cache_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms is not None and not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"batch wait {self.batch_wait_ms} ms is outside [0, 1000]")
        if not 1 <= self.join_timeout_s <= 3600:
            raise ConfigError(f"join timeout {self.join_timeout_s} s is outside [1, 3600]")
        if not 0 <= self.drain_grace_s <= 24 * 3600:
            raise ConfigError(f"drain grace {self.drain_grace_s} s is outside [0, 86400]")
        for name in ("drain_notice_file_period_s", "drain_notice_url_period_s", "drain_notice_url_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        self._check_placement()
        self._check_precision()
        if self.drain_notice_url is not None:
            url = urlsplit(self.drain_notice_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ConfigError(
                    f"drain notice URL {self.drain_notice_url!r} is not an http(s) URL; "
                    "e.g. http://169.254.169.254/latest/meta-data/spot/instance-action"
                )

    def _check_precision(self) -> None:
        from swarm.runtime.quant import KV_FORMATS, WEIGHT_SCHEMES

        if self.quant not in WEIGHT_SCHEMES:
            raise ConfigError(f"--quant {self.quant!r}: use one of {', '.join(WEIGHT_SCHEMES)}")
        if self.kv_dtype not in KV_FORMATS:
            raise ConfigError(f"--kv-dtype {self.kv_dtype!r}: use one of {', '.join(KV_FORMATS)}")
        if self.offload_blocks < 0:
            raise ConfigError(f"--offload-blocks must be >= 0, got {self.offload_blocks}")
        if self.offload_blocks and self.quant != "none":
            raise ConfigError("--offload-blocks keeps blocks in the dtype; it does not combine with --quant yet")

    def _check_placement(self) -> None:
        if self.span is not None and self.num_blocks is not None:
            raise ConfigError("give --blocks (a span) or --num-blocks (a size chosen where the swarm needs it), not both")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ConfigError(f"memory budget must be >= 1 byte, got {self.memory_bytes}")
        if not 0 <= self.join_jitter_s <= 600:
            raise ConfigError(f"join jitter {self.join_jitter_s} s is outside [0, 600]")
        if not (self.rebalance_period_s == 0 or 1 <= self.rebalance_period_s <= 7 * 24 * 3600):
            raise ConfigError(f"rebalance period {self.rebalance_period_s} s: use 0 (off) or [1, 604800]")
        if not 0 <= self.rebalance_margin <= 100:
            raise ConfigError(f"rebalance margin {self.rebalance_margin} is outside [0, 100] (0.2 = 20%)")
        if not 0 <= self.rebalance_delay_s <= 3600:
            raise ConfigError(f"rebalance delay {self.rebalance_delay_s} s is outside [0, 3600]")
        if not 0 <= self.network_probe_period_s <= 24 * 3600:
            raise ConfigError(f"network probe period {self.network_probe_period_s} s is outside [0, 86400]")

    @property
    def limits(self) -> dict:
        return {
            "max_tokens_per_step": self.max_tokens_per_step,
            "max_session_length_tokens": self.max_session_length_tokens,
            "max_batch_size": self.max_batch_size,
            "max_sessions_per_client": self.max_sessions_per_client,
            "max_message_bytes": self.max_message_bytes,
            "session_idle_timeout_s": self.session_idle_timeout_s,
        }
