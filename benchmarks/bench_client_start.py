"""How long a client's transport (p2pd + a client-mode DHT node) takes to join, with and without hivemind's
identity-in-use check, in one run, as one JSON object on stdout.

A DHT node started here is the bootstrap node (loopback). The check (NodeSettings.check_identity_free) starts a
second, anonymous p2pd that joins through the initial peers and dials our identity; clients skip it for
their ephemeral identities (client.transport.HivemindTransport). Each round starts and stops one transport
with the check and one without, alternating; medians over the rounds, and their ratio.

    python benchmarks/bench_client_start.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from swarm import records
from swarm.identity import Identity
from swarm.net import NodeSettings, start_dht, start_p2p, stop_node, visible_maddrs


async def start_client(initial_peers: list[str], check_identity_free: bool) -> float:
    """Seconds to start a client-mode p2pd and DHT node as HivemindTransport does (then stopped)."""
    identity = Identity.load_or_create(None)
    settings = NodeSettings(initial_peers=tuple(initial_peers), client_mode=True,
                            identity_path=identity.p2pd_identity_path, check_identity_free=check_identity_free)
    started = time.monotonic()
    try:
        p2p = await start_p2p(settings)
    finally:
        identity.close()
    dht = await start_dht(p2p, settings, records.make_record_validator(identity))
    elapsed = time.monotonic() - started
    await stop_node(dht, p2p)
    return elapsed


async def run(rounds: int) -> dict:
    settings = NodeSettings()
    p2p = await start_p2p(settings)
    dht = await start_dht(p2p, settings)
    try:
        initial_peers = await visible_maddrs(p2p)
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        for _ in range(rounds):
            times["checked"].append(await start_client(initial_peers, True))
            times["unchecked"].append(await start_client(initial_peers, False))
    finally:
        await stop_node(dht, p2p)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "rounds": rounds,
        "start_s": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "median_s": {name: round(v, 3) for name, v in medians.items()},
        "unchecked_over_checked": round(medians["unchecked"] / medians["checked"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    print(json.dumps(asyncio.run(run(p.parse_args().rounds)), indent=1))


if __name__ == "__main__":
    main()
