"""swarm.net: DHT nodes keep their routing tables whole (real hivemind nodes and p2pd daemons)."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.net import NodeSettings, start_dht, start_p2p, stop_node, visible_maddrs


async def _node(initial_peers=(), **fields):
    settings = NodeSettings(initial_peers=tuple(initial_peers), **fields)
    p2p = await start_p2p(settings)
    dht = await start_dht(p2p, settings)
    return p2p, dht


async def _relearns(refresh_s: float | None, wait_s: float) -> bool:
    """Three nodes; one of them forgets another (as hivemind does when an RPC goes unanswered); whether
    it knows it again within `wait_s`, without that node contacting it."""
    nodes = []
    try:
        nodes.append(await _node(routing_refresh_s=refresh_s))
        first = [str(a) for a in await visible_maddrs(nodes[0][0])]
        nodes.append(await _node(first, routing_refresh_s=refresh_s))
        nodes.append(await _node(first, routing_refresh_s=refresh_s))
        table = nodes[1][1].protocol.routing_table
        forgotten = nodes[2][1].node_id
        deadline = time.monotonic() + 10
        while forgotten not in table and time.monotonic() < deadline:  # it learns of the third at its start
            await nodes[1][1].find_nearest_nodes([forgotten])
        assert forgotten in table
        del table[forgotten]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if forgotten in table:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        for p2p, dht in reversed(nodes):
            await stop_node(dht, p2p)


@pytest.mark.parametrize("refresh_s, expected", [(1.0, True), (None, False)])
def test_a_node_relearns_a_forgotten_neighbour_by_refreshing_its_table(refresh_s, expected):
    assert asyncio.run(asyncio.wait_for(_relearns(refresh_s, wait_s=6.0), 60)) is expected
