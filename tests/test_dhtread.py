"""swarm.dhtread: complete reads from a quorum of each key's replicas (real hivemind nodes and p2pd daemons).

Eight DHT nodes each store their own subkey under two keys (hivemind's store: each on the 5 nodes nearest
the key); a client-mode node reads them back. The read returns what hivemind's own latest=True read
returns, every subkey of every key, in fewer calls; so does a reader whose routing table lost every node
but one, and one that suspends every node; with the two nodes nearest a key gone it still does, within the
protocol's wait for the dead ones.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.dht.routing import DHTID
from hivemind.utils.timed_storage import get_dht_time

from swarm import dhtread
from swarm.dhtread import ReadStats, read_latest
from swarm.net import NodeSettings, start_dht, start_p2p, stop_node, visible_maddrs

SERVERS = 8
KEYS = ("model.0", "model.1")


async def _node(initial_peers=(), **fields):
    settings = NodeSettings(initial_peers=tuple(initial_peers), routing_refresh_s=None, **fields)
    p2p = await start_p2p(settings)
    return p2p, await start_dht(p2p, settings)


def _subkeys(found) -> dict:
    return {subkey: item.value for subkey, item in found.value.items()} if found is not None else None


async def _scenario() -> None:
    nodes = []
    try:
        nodes.append(await _node())
        first = [str(a) for a in await visible_maddrs(nodes[0][0])]
        for _ in range(SERVERS - 1):
            nodes.append(await _node(first))
        expiration = get_dht_time() + 120
        for i, (_, dht) in enumerate(nodes):
            for key in KEYS:
                assert await dht.store(key, f"record of {i}", expiration, subkey=f"peer{i}")
        reader_p2p, reader = await _node(first, client_mode=True)
        nodes.append((reader_p2p, reader))
        await reader.find_nearest_nodes([DHTID.generate(KEYS[0])])  # the reader learns the swarm
        expected = {f"peer{i}": f"record of {i}" for i in range(SERVERS)}

        stats = ReadStats()
        found = await read_latest(reader, [*KEYS, "nobody.stored.this"], timeout_s=10, stats=stats)
        assert {key: _subkeys(found[key]) for key in KEYS} == dict.fromkeys(KEYS, expected)
        assert found["nobody.stored.this"] is None
        hivemind = await reader.get_many(list(KEYS), sufficient_expiration_time=float("inf"))
        assert {key: _subkeys(hivemind[key]) for key in KEYS} == dict.fromkeys(KEYS, expected)
        assert found[KEYS[0]].expiration_time == hivemind[KEYS[0]].expiration_time
        assert stats.keys_unfinished == 0 and stats.calls <= SERVERS, stats

        # a reader whose table thinned out to one node that holds nothing, and who can dial no other at once
        # (a client that nobody contacts), still gets every record: the nodes the answers name are asked too
        late_p2p, late = await _node(first)
        nodes.append((late_p2p, late))
        assert await reader.protocol.call_ping(late.peer_id) == late.node_id
        await asyncio.sleep(0.5)  # the table takes it in a task; the servers hand it copies they meant it to hold
        for key_id in map(DHTID.generate, KEYS):
            for storage in (late.protocol.storage, late.protocol.cache):
                if storage.get(key_id) is not None:
                    del storage[key_id]
        table = reader.protocol.routing_table
        for node_id in list(table.uid_to_peer_id):
            if node_id != late.node_id:
                del table[node_id]
        assert list(table.uid_to_peer_id) == [late.node_id]

        async def only_the_late_node(_node):
            return {late.peer_id}

        original, dhtread._dialable = dhtread._dialable, only_the_late_node
        try:
            stats = ReadStats()
            found = await read_latest(reader, list(KEYS), timeout_s=10, stats=stats)
        finally:
            dhtread._dialable = original
        assert {key: _subkeys(found[key]) for key in KEYS} == dict.fromkeys(KEYS, expected), stats
        # (a node that answers joins the table, so a key read after another may find its nodes there)
        assert stats.keys_widened >= 1, stats

        # a reader whose blacklist suspends every node it knows (its calls timed out under load) reads all too
        for _, dht in nodes:
            if dht is not reader:
                reader.blacklist.register_failure(dht.peer_id)
        stats = ReadStats()
        found = await read_latest(reader, list(KEYS), timeout_s=10, stats=stats)
        assert {key: _subkeys(found[key]) for key in KEYS} == dict.fromkeys(KEYS, expected), stats

        # the two servers nearest the first key leave without a word: others hold its records too
        key_id = DHTID.generate(KEYS[0])
        servers = sorted(nodes[:SERVERS], key=lambda n: n[1].node_id.xor_distance(key_id))
        for p2p, dht in servers[:2]:
            await stop_node(dht, p2p)
            nodes.remove((p2p, dht))
        started = time.monotonic()
        stats = ReadStats()
        found = await read_latest(reader, [KEYS[0]], timeout_s=20, stats=stats)
        assert _subkeys(found[KEYS[0]]) == expected, stats
        assert time.monotonic() - started < reader.protocol.wait_timeout + 5, stats
    finally:
        for p2p, dht in reversed(nodes):
            await stop_node(dht, p2p)


@pytest.mark.slow
def test_quorum_reads_return_every_record_and_survive_the_nearest_nodes_leaving():
    asyncio.run(asyncio.wait_for(_scenario(), 180))
