"""`swarm bootstrap`: a long-lived DHT node with a stable identity that peers and clients join through.

Prints each full multiaddr on its own stdout line, then serves until SIGINT/SIGTERM. With
--health-port it also serves the health page, JSON and metrics (bootstrap.health) from the same event
loop and DHT node, and prints "health page at <url>" after the multiaddrs.

With --swarm-key FILE the swarm is private (swarm.admission): only holders of that key file may store or
read records, open sessions on peers or be crawled; the bootstrap says so on a line of its own after
the multiaddrs, and its health page publishes a summary unless --health-publish says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from bootstrap.health.cli import add_health_arguments, health_config, start_health
from swarm import records
from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.net import NodeSettings, start_dht, start_p2p, stop_node, visible_maddrs
from swarm.swarmkey import SwarmKey


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm bootstrap", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=0, help="libp2p TCP port (0 = any free port)")
    p.add_argument("--identity", help="identity file; created if missing, keeps the peer id across restarts")
    p.add_argument("--initial-peers", nargs="*", default=[], help="other bootstrap nodes to join")
    p.add_argument(
        "--announce-maddrs", nargs="*", default=[],
        help="addresses others should dial, if not the listen ones",
    )
    p.add_argument("--swarm-key", metavar="FILE",
                   help="make the swarm private: only holders of this key file may join it (make one with "
                        "`swarm make-swarm-key FILE`, then give a copy to every peer and client)")
    add_health_arguments(p, prefix="health-")
    return p


async def serve(args: argparse.Namespace) -> None:
    swarm_key = SwarmKey.load(args.swarm_key) if args.swarm_key else None
    # validated before anything starts
    health = health_config(args, swarm_key) if args.health_port is not None else None
    identity = Identity.load_or_create(args.identity)
    settings = NodeSettings(
        initial_peers=tuple(args.initial_peers), host=args.host, port=args.port,
        announce_maddrs=tuple(args.announce_maddrs), identity_path=identity.p2pd_identity_path,
        swarm_key=swarm_key,
    )
    p2p = await start_p2p(settings)
    identity.close()
    dht = health_server = None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        dht = await start_dht(p2p, settings, records.make_record_validator(identity))
        for maddr in await visible_maddrs(p2p):
            print(maddr, flush=True)
        if swarm_key is not None:
            print(f"private swarm: key id {swarm_key.key_id} ({swarm_key.path}); only holders of that key file "
                  "may join", flush=True)
        if health is not None:
            health_server = await start_health(health, dht, p2p)
            print(f"health page at {health_server.url}", flush=True)
        await stop.wait()
    finally:
        if health_server is not None:
            await health_server.close()
        await stop_node(dht, p2p)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except SwarmError as e:
        print(f"swarm bootstrap: {e}", file=sys.stderr)
        return 1
    return 0
