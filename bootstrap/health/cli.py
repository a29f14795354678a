"""`swarm health`: a standalone health monitor; joins the DHT as a client and serves the health page.

`swarm bootstrap --health-port P` runs the same HealthServer inside the bootstrap process instead;
both build their flags from HealthConfig through `add_health_arguments` / `health_config`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import fields

from bootstrap.health.config import HealthConfig
from bootstrap.health.publish import PUBLISH_MODES
from bootstrap.health.server import HealthServer
from swarm import records
from swarm.errors import ConfigError, SwarmError
from swarm.lite import BACKENDS, backend
from swarm.swarmkey import SwarmKey

_DEFAULTS = {f.name: f.default for f in fields(HealthConfig)}


def add_health_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The HTTP and crawl flags; `prefix` ("health-") keeps them apart from libp2p's --host/--port."""
    d = _DEFAULTS
    p.add_argument(
        f"--{prefix}host",
        dest="health_host",
        default=d["host"],
        help=f"HTTP listen address, 0.0.0.0 to publish the page (default {d['host']})",
    )
    if prefix:  # in `swarm bootstrap` the page is off unless a port is given
        p.add_argument(
            "--health-port",
            dest="health_port",
            type=int,
            default=None,
            help="serve the health page, JSON and metrics on this HTTP port (0 = any free port)",
        )
    else:
        p.add_argument(
            "--port",
            dest="health_port",
            type=int,
            default=d["port"],
            help=f"HTTP port (0 = any free port; default {d['port']})",
        )
    p.add_argument(
        f"--{prefix}refresh-s",
        dest="health_refresh_s",
        type=float,
        default=d["refresh_s"],
        help=f"seconds between crawls of the DHT and probes of every peer (default {d['refresh_s']:g})",
    )
    p.add_argument(
        f"--{prefix}probe-timeout-s",
        dest="health_probe_timeout_s",
        type=float,
        default=d["probe_timeout_s"],
        help="bound on each peer's info probe",
    )
    p.add_argument(
        f"--{prefix}publish",
        dest="health_publish",
        choices=PUBLISH_MODES,
        help="what the page, JSON and metrics show: full (every peer), summary (coverage and totals, no peer ids, "
        "addresses or names) or none (403); default: full, or summary for a private swarm (--swarm-key)",
    )
    if not prefix:  # `swarm bootstrap` has its own --swarm-key, for the whole node
        p.add_argument("--swarm-key", metavar="FILE", help="crawl a private swarm: its swarm key file")
    p.add_argument(
        f"--{prefix}reachability-any-ip",
        dest="health_any_ip",
        action="store_true",
        help="let reachability checks dial any IP, not only the caller's (trusted networks only)",
    )


def health_config(args: argparse.Namespace, swarm_key: SwarmKey | None = None) -> HealthConfig:
    """The config from the flags; `swarm_key` (the bootstrap's) wins over this command's --swarm-key."""
    if swarm_key is None and getattr(args, "swarm_key", None):
        swarm_key = SwarmKey.load(args.swarm_key)
    return HealthConfig(
        host=args.health_host,
        port=args.health_port,
        refresh_s=args.health_refresh_s,
        probe_timeout_s=args.health_probe_timeout_s,
        reachability_same_ip_only=not args.health_any_ip,
        swarm_key=swarm_key,
        publish=args.health_publish,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm health", description=__doc__.split("\n\n")[0])
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of bootstrap nodes or peers")
    p.add_argument("--transport", choices=BACKENDS, default="auto",
                   help="network backend: hivemind (p2pd), lite (py-libp2p, swarm-llm[lite]; no reachability "
                        "checks) or auto (hivemind where installed, else lite)")
    add_health_arguments(p)
    return p


async def serve(args: argparse.Namespace, config: HealthConfig) -> None:
    if backend(getattr(args, "transport", "auto")) == "lite":
        return await serve_lite(args, config)
    from swarm.identity import Identity
    from swarm.net import NodeSettings, start_dht, start_p2p, stop_node

    identity = Identity.load_or_create(None)
    settings = NodeSettings(
        initial_peers=tuple(args.initial_peers), client_mode=True, identity_path=identity.p2pd_identity_path,
        check_identity_free=False, swarm_key=config.swarm_key,  # an ephemeral identity: no one else holds it
    )
    try:
        p2p = await start_p2p(settings)
    finally:
        identity.close()
    dht = None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        dht = await start_dht(p2p, settings, records.make_record_validator(identity))
        server = await start_health(config, dht, p2p)
        try:
            print(f"health page at {server.url}", flush=True)
            await stop.wait()
        finally:
            await server.close()
    finally:
        await stop_node(dht, p2p)


async def serve_lite(args: argparse.Namespace, config: HealthConfig) -> None:
    """`serve` on the lite backend: a LiteNode reads the DHT and probes peers for the crawler (public swarms;
    no reachability checks, which need a probe p2pd)."""
    from swarm.lite.node import LiteNode

    if config.swarm_key is not None:
        raise ConfigError("the lite backend crawls public swarms only; use --transport hivemind with "
                          "--swarm-key")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    node = await LiteNode.start(args.initial_peers, 30.0)
    try:
        server = await start_health(config, node.dht, node)
        try:
            print(f"health page at {server.url}", flush=True)
            await stop.wait()
        finally:
            await server.close()
    finally:
        await node.shutdown()


async def start_health(config: HealthConfig, dht, p2p) -> HealthServer:
    """A started HealthServer; ConfigError with advice if its port is taken."""
    server = HealthServer(config, dht, p2p)
    try:
        await server.start()
    except OSError as e:
        await server.close()
        raise ConfigError(
            f"cannot serve the health page on {config.host}:{config.port} ({e.strerror or e}); "
            "pick another port (0 for any free one)"
        ) from e
    return server


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args, health_config(args)))  # health_config raises ConfigError on bad values
    except SwarmError as e:
        print(f"swarm health: {e}", file=sys.stderr)
        return 1
    return 0
