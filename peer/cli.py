"""`swarm peer`: serve a span of a model's blocks to the swarm.

Without --blocks the peer chooses its span from the DHT (peer.placement): as many blocks as its memory
allows, where the swarm is weakest, announced `joining` before it loads; later it moves when that
raises the swarm's minimum coverage by more than --rebalance-margin (draining first, as on SIGTERM).

Prints one line starting with `ready` (peer id, model id, blocks, multiaddrs) once it serves and is
announced. Leaving (peer.drain): Ctrl-C / SIGINT announces `offline` and exits at once; SIGTERM, a file
at --drain-notice-file or a notice at --drain-notice-url starts draining (a `draining: ...` line): no
new sessions, open ones go on until they close or --drain-grace-s passes, then `offline` and exit 0. A
second SIGTERM or SIGINT while draining exits at once. The last line says why it leaves (`leaving ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import signal
import sys

from swarm.errors import ConfigError, SwarmError
from swarm.spans import Span
from swarm.swarmkey import SwarmKey

from peer.config import PeerConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PeerConfig)}


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(prog="swarm peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--blocks", help="span to serve, START:END (END exclusive), e.g. 0:16; default: chosen from the "
                                    "DHT where the swarm is weakest, as many blocks as memory allows, and moved "
                                    "later when that helps the swarm (--rebalance-period-s)")
    p.add_argument("--num-blocks", type=int, help="without --blocks: serve this many blocks (default: as many as fit)")
    p.add_argument("--memory", dest="memory_bytes", type=parse_size, metavar="SIZE",
                   help="without --blocks: memory for weights, KV cache and activations when choosing how many "
                        "blocks to serve (e.g. 8GiB; default: what the device has free)")
    p.add_argument("--join-jitter-s", type=float, default=d["join_jitter_s"],
                   help="after announcing its choice, wait a random [J/2, J] s and choose again, so peers started "
                        "together do not all take the same blocks")
    p.add_argument("--rebalance-period-s", type=float, default=d["rebalance_period_s"],
                   help="without --blocks: how often to check whether moving to other blocks helps the swarm (0 = never)")
    p.add_argument("--rebalance-margin", type=float, default=d["rebalance_margin"],
                   help="move only when the swarm's minimum coverage rises by more than this fraction (0.2 = 20%%)")
    p.add_argument("--rebalance-delay-s", type=float, default=d["rebalance_delay_s"],
                   help="random wait, up to this, between deciding to move and checking again before moving")
    p.add_argument("--throughput-cache", metavar="FILE",
                   help="where the measured compute throughput is cached (default: $SWARM_CACHE_DIR/throughput.json "
                        "or ~/.cache/swarm/throughput.json)")
    p.add_argument("--remeasure-throughput", action="store_true", help="measure the throughput even if it is cached")
    p.add_argument("--network-probe-period-s", type=float, default=d["network_probe_period_s"],
                   help="how often to measure round trip and bandwidth to the neighbouring peers (0 = never)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of a bootstrap node or any peer")
    p.add_argument("--join-timeout-s", type=float, default=d["join_timeout_s"],
                   help="how long to keep trying the initial peers at start")
    p.add_argument("--host", default=d["host"], help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=d["port"], help="libp2p TCP port (0 = any free port)")
    p.add_argument("--direct-port", type=int, default=d["direct_port"],
                   help="TCP port for direct TLS streams beside libp2p (the fast path for steps; 0 = any free port); "
                        "open it in your firewall like --port")
    p.add_argument("--no-direct", dest="direct_port", action="store_const", const=None,
                   help="serve over libp2p only (no direct streams)")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="addresses others should dial (NAT, relay)")
    p.add_argument("--identity", help="identity file; created if missing, a restart with it is the same peer")
    p.add_argument("--swarm-key", metavar="FILE",
                   help="join a private swarm: its swarm key file (from its owner; `swarm make-swarm-key` makes one)")
    p.add_argument("--model-id", help="name announced for the model (default: the checkpoint folder's name)")
    p.add_argument("--public-name", default="", help="a name shown on the health page")
    p.add_argument("--health-url", help="the swarm's health page (http://host:port); checks reachability at start")
    p.add_argument("--device", default=d["device"], help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--quant", choices=["none", "int8", "fp8", "nf4"], default=d["quant"],
                   help="store the blocks' linear weights in lower precision (torchao; pip install "
                        "'swarm-llm[quant]'): int8 and fp8 halve bf16 weights, nf4 quarters them; announced, "
                        "so clients that ask for full precision route around this peer")
    p.add_argument("--kv-dtype", choices=["auto", "fp8"], default=d["kv_dtype"],
                   help="KV cache pages: auto (the dtype) or fp8 (float8 codes with a scale per vector: about half "
                        "of bf16, so twice the cached tokens)")
    p.add_argument("--offload-blocks", type=int, default=d["offload_blocks"], metavar="N",
                   help="keep the weights of the span's last N blocks in host RAM and stream them to the device "
                        "for each forward (more blocks than the GPU holds, at the cost of PCIe traffic per step)")
    p.add_argument("--kv-offload", action="store_true",
                   help="keep the KV cache in host RAM (--cache-bytes then counts host memory): a longer context "
                        "than the GPU holds, each step reading its session's cache over PCIe")
    p.add_argument("--cache-tokens", type=int, default=d["cache_tokens"], help="KV cache budget in token slots")
    p.add_argument("--cache-bytes", type=parse_size, metavar="SIZE",
                   help="KV cache budget in bytes (e.g. 20GiB, 512MB; overrides --cache-tokens), or 'auto': "
                        "most of the memory the weights leave free")
    p.add_argument("--max-sessions-per-client", type=int, default=d["max_sessions_per_client"])
    p.add_argument("--max-batch-tokens", type=int, default=d["max_batch_tokens"],
                   help="token rows in one batched forward (continuous batching across sessions)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=d["prefill_chunk_tokens"],
                   help="prompts run in chunks of this many tokens so other sessions' steps are not stalled")
    p.add_argument("--admission-timeout-s", type=float, default=d["admission_timeout_s"],
                   help="how long a new session waits for KV memory before it is refused")
    p.add_argument("--batch-wait-ms", type=float, default=d["batch_wait_ms"],
                   help="how long a decode step may wait for other active sessions' steps to share its forward; the "
                        "wait ends early once no step came for an eighth of it (default: 40 on CUDA, 0 on CPU)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run batched decode steps eagerly instead of replaying CUDA graphs (CUDA only)")
    p.add_argument("--max-session-length", type=int, default=d["max_session_length_tokens"])
    p.add_argument("--max-tokens-per-step", type=int, default=d["max_tokens_per_step"])
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: all cores); use 1 when several peers share a machine")
    p.add_argument("--drain-grace-s", type=float, default=d["drain_grace_s"],
                   help="on SIGTERM or a drain notice: how long open sessions may go on before leaving")
    p.add_argument("--drain-notice-file", metavar="PATH",
                   help="start draining once this file exists (checked every second; spot-instance agents)")
    p.add_argument("--drain-notice-url", metavar="URL",
                   help="start draining once a GET of this URL answers 200 with a body (404 = no notice), "
                   "e.g. http://169.254.169.254/latest/meta-data/spot/instance-action")
    p.add_argument("--drain-notice-url-period-s", type=float, default=d["drain_notice_url_period_s"],
                   help="how often to poll --drain-notice-url")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str) -> int | str:
    """'auto', or a byte count with an optional unit: 512MB, 20GiB, 1.5GB, 1000000."""
    if text.strip().lower() == "auto":
        return "auto"
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MB, 20GiB or 'auto'")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    return PeerConfig(
        model_path=args.model, span=Span.parse(args.blocks) if args.blocks else None,
        initial_peers=tuple(args.initial_peers), join_timeout_s=args.join_timeout_s,
        host=args.host, port=args.port, direct_port=args.direct_port, announce_maddrs=tuple(args.announce_maddrs), identity_path=args.identity,
        swarm_key=SwarmKey.load(args.swarm_key) if args.swarm_key else None,
        model_id=args.model_id, public_name=args.public_name, health_url=args.health_url, device=args.device, dtype=args.dtype,
        cache_tokens=args.cache_tokens, cache_bytes=args.cache_bytes, quant=args.quant, kv_dtype=args.kv_dtype,
        offload_blocks=args.offload_blocks, kv_offload=args.kv_offload,
        max_sessions_per_client=args.max_sessions_per_client, max_batch_tokens=args.max_batch_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens, admission_timeout_s=args.admission_timeout_s,
        batch_wait_ms=args.batch_wait_ms,
        cuda_graphs=args.cuda_graphs, max_session_length_tokens=args.max_session_length,
        max_tokens_per_step=args.max_tokens_per_step, num_threads=args.num_threads, progress=True,
        drain_grace_s=args.drain_grace_s, drain_notice_file=args.drain_notice_file,
        drain_notice_url=args.drain_notice_url, drain_notice_url_period_s=args.drain_notice_url_period_s,
        num_blocks=args.num_blocks, memory_bytes=_bytes(args.memory_bytes, "--memory"),
        join_jitter_s=args.join_jitter_s,
        rebalance_period_s=args.rebalance_period_s, rebalance_margin=args.rebalance_margin,
        rebalance_delay_s=args.rebalance_delay_s, throughput_cache=args.throughput_cache,
        remeasure_throughput=args.remeasure_throughput, network_probe_period_s=args.network_probe_period_s,
    )


def _bytes(size: int | str | None, flag: str) -> int | None:
    if size == "auto":
        raise ConfigError(f"{flag} takes a size like 8GiB, not 'auto' (leave it out for what the device has free)")
    return size


def status_line(server, config: PeerConfig) -> str:
    """The one-line status a volunteer sees once the peer is online."""
    link = f"; health page: {config.health_url.rstrip('/')}/#peer-{server.peer_id}" if config.health_url else ""
    private = f" in the private swarm of key {config.swarm_key.key_id}" if config.swarm_key else ""
    return (
        f"online: serving blocks {server.span} of {server.model_id}{_precision(config)}{private} on {config.device} "
        f"({server.compute_tokens_s:.0f} tokens/s per block, {server.sessions.cache_tokens_left} cache slots){link}"
    )


def _precision(config: PeerConfig) -> str:
    parts = [f"{config.quant} weights"] if config.quant != "none" else []
    parts += ["fp8 KV cache"] if config.kv_dtype == "fp8" else []
    parts += [f"{config.offload_blocks} blocks' weights in host RAM"] if config.offload_blocks else []
    parts += ["KV cache in host RAM"] if config.kv_offload else []
    return f" ({', '.join(parts)})" if parts else ""


async def serve(config: PeerConfig) -> None:
    from peer.drain import DrainController
    from peer.server import PeerServer  # heavy imports (torch, transformers) after argument checks

    server = PeerServer(config, say=lambda line: print(line, flush=True))
    drain = DrainController(server, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, drain.on_signal, sig)
    try:
        await server.start()
        print(
            f"ready peer_id={server.peer_id} model={server.model_id} blocks={server.span} "
            f"addrs={','.join(server.addrs)} direct={','.join(server.direct_addrs) or 'off'}",
            flush=True,
        )
        print(status_line(server, config), flush=True)
        if config.health_url:
            from peer.reachability import check

            print(await check(config.health_url, server.peer_id, server.addrs), flush=True)
        reason = await _until_leave(drain, server)
        print(f"leaving ({reason}): announcing offline", flush=True)
    finally:
        await server.shutdown()


async def _until_leave(drain, server) -> str:
    """Why the peer leaves: the drain controller's answer, or a failed move (server.fatal)."""
    draining = asyncio.ensure_future(drain.run())
    failed = asyncio.ensure_future(server.fatal.wait())
    try:
        await asyncio.wait([draining, failed], return_when=asyncio.FIRST_COMPLETED)
        return draining.result() if draining.done() else "a move to other blocks failed"
    finally:
        for task in (draining, failed):
            task.cancel()
        await asyncio.gather(draining, failed, return_exceptions=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        asyncio.run(serve(config))
    except SwarmError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 1
    return 0
