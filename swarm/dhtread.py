"""Complete reads of many DHT keys at once: each key from a quorum of the nodes that hold it.

A key is stored on the `num_replicas` nodes nearest to it (hivemind's store), and every announce stores a
peer's record under its subkey on each of them, so any few of those nodes hold nearly the whole
dictionary. hivemind's latest=True read instead walks each key's beam until it is exhausted, a few RPCs
at a time: at 30 peers behind 20-100 ms links that took 2.6 s at the median (benchmarks/README.md), a
client's route waited on it, and the many sequential calls loaded every node.

`read_latest` asks, for every key, the `width` nearest nodes it knows (num_replicas + a margin), all
keys' questions to one node in one call_find and every node at once. Each answer names the nodes its
sender knows nearest to the key; nearer ones are asked as they turn up (what a Kademlia lookup does, but
with no limit on calls in flight). A key is done once `quorum` of its `width` nearest known nodes have
answered with records for it (a slow one among them is not waited for; a node that holds nothing for
the key does not count), or once every one of them answered or failed; the read ends when every key is
done or at `timeout_s`, with what came. Answers merge as hivemind merges them (each subkey's latest
expiration wins; records are validated and stripped by the node's record validator as hivemind's own
reads do), so callers see exactly what DHTNode.get_many returns for latest=True.

First choices are the nodes this node's p2pd can dial at once and that its blacklist does not suspend:
those in its routing table (they answered before), those it is connected to, and those whose addresses
its address book holds (swarm.net.AddressBook, from the records it read). A DHT answer names nodes by
peer id only, and p2pd must look the others up in its own DHT before the call; a suspended node missed
an answer lately. Asking every node the answers named emptied a client-mode node's routing table under
load in two 30-peer runs of the scale harness, when each failed call dropped the node. But a key whose
first choices give fewer than a quorum of answers with records is not done: the other nodes named for
it are asked too (the nearest `width`, as any node), suspended or not. Without that, a reader whose
table had thinned out (a client, which nobody contacts) concluded "no record" for keys whose holders it
had only heard of; and one whose calls to a key's holders had timed out under load (which suspends them)
would read nothing of it until the suspensions ran out, as hivemind's own read skips suspended nodes.

Where it differs from hivemind's read beside that: it puts nothing into any cache (readers here always
want fresh records; see swarm.net's cache_refresh_before_expiry). Tied to hivemind 1.1.12's DHTNode
internals (pinned in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from dataclasses import dataclass, field

from hivemind.dht.node import DHTNode, _SearchState
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)

WIDTH_MARGIN = 2  # nodes asked per key beyond num_replicas (one that left, one that is slow)
QUORUM = 3  # answers from a key's nearest nodes that make it done


@dataclass
class _Key:
    key_id: DHTID
    state: _SearchState
    asked: set[DHTID] = field(default_factory=set)
    answered: set[DHTID] = field(default_factory=set)
    holders: set[DHTID] = field(default_factory=set)  # answered with a value for the key
    # named for the key but not a first choice: p2pd cannot dial it at once, or this node's blacklist
    # suspends it (it missed an answer lately)
    unreached: dict[DHTID, PeerID] = field(default_factory=dict)
    widened: bool = False  # the unreached nodes count as known for this key (see ask_more)


@dataclass
class ReadStats:
    """What one read did (for benchmarks and debug logs)."""

    calls: int = 0
    nodes_failed: int = 0
    keys_unfinished: int = 0
    keys_widened: int = 0  # keys whose first choices fell short of a quorum (the others were asked too)


async def read_latest(
    node: DHTNode, keys: list[str], timeout_s: float, *, width: int | None = None, quorum: int | None = None,
    stats: ReadStats | None = None,
) -> dict[str, object]:
    """{key: hivemind's ValueWithExpiration (the merged dictionary or latest value) or None}. Defaults:
    width num_replicas + WIDTH_MARGIN, quorum QUORUM (a quorum of width or more waits for every one)."""
    protocol = node.protocol
    width = width if width is not None else node.num_replicas + WIDTH_MARGIN
    quorum = max(1, min(QUORUM if quorum is None else quorum, width))
    stats = stats if stats is not None else ReadStats()
    by_id = {DHTID.generate(key): key for key in keys}
    states = {
        key_id: _Key(key_id, _SearchState(key_id, float("inf"), serializer=protocol.serializer,
                                          record_validator=protocol.record_validator))
        for key_id in by_id
    }
    reachable = await _dialable(node)

    def first_choice(peer: PeerID) -> bool:
        return (peer in reachable or peer in protocol.routing_table) and peer not in node.blacklist

    known: dict[DHTID, PeerID] = {}  # first-choice nodes, for every key
    for key_id, k in states.items():
        k.state.add_candidate(protocol.storage.get(key_id), source_node_id=node.node_id)
        nearest_in_table = protocol.routing_table.get_nearest_neighbors(key_id, width, exclude=node.node_id)
        for node_id, peer in nearest_in_table:
            if first_choice(peer):
                known[node_id] = peer
            else:
                k.unreached[node_id] = peer
    failed: set[DHTID] = set()  # gave no answer to a call of this read: not asked again, for any key
    in_flight: dict[asyncio.Task, tuple[DHTID, list[DHTID]]] = {}

    def nearest(k: _Key) -> list[DHTID]:
        pool = known.keys() | k.unreached.keys() if k.widened else known.keys()
        usable = (n for n in pool if n not in failed)
        return heapq.nsmallest(width, usable, key=lambda n: n.xor_distance(k.key_id))

    def peer_of(k: _Key, n: DHTID) -> PeerID:
        return known[n] if n in known else k.unreached[n]

    def done(k: _Key) -> bool:
        near = nearest(k)
        return (sum(n in k.holders for n in near) >= quorum
                or all(n in k.answered for n in near))

    async def ask(peer: PeerID, key_ids: list[DHTID]):
        # the blacklist is kept as hivemind's calls keep it, but a suspended node is still asked when it is
        # among the few that can tell (see the module's docstring)
        response = await protocol.call_find(peer, key_ids)
        if response:
            node.blacklist.register_success(peer)
        else:
            node.blacklist.register_failure(peer)
        return response

    def ask_more() -> None:
        plan: dict[DHTID, list[DHTID]] = {}
        peers: dict[DHTID, PeerID] = {}
        for k in states.values():
            if done(k):
                if k.widened or len(k.holders) >= quorum or not k.unreached:
                    continue
                k.widened = True  # the first choices are short of a quorum: ask the others named too
                stats.keys_widened += 1
                if done(k):
                    continue
            for n in nearest(k):
                if n not in k.asked:
                    k.asked.add(n)
                    plan.setdefault(n, []).append(k.key_id)
                    peers[n] = peer_of(k, n)
        for n, key_ids in plan.items():
            stats.calls += 1
            task = asyncio.ensure_future(ask(peers[n], key_ids))
            in_flight[task] = (n, key_ids)

    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout_s
    try:
        ask_more()
        while in_flight and not all(done(k) for k in states.values()):
            left = deadline - loop.time()
            if left <= 0:
                break
            finished, _ = await asyncio.wait(in_flight, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                n, key_ids = in_flight.pop(task)
                response = None if task.cancelled() or task.exception() is not None else task.result()
                if not response:  # no answer (gone or slow): the next nearest node stands in, for every key
                    stats.nodes_failed += 1
                    failed.add(n)
                    continue
                for key_id, (value, neighbours) in response.items():
                    k = states.get(key_id)
                    if k is None:
                        continue
                    k.answered.add(n)
                    if value is not None:
                        k.holders.add(n)
                    k.state.add_candidate(value, source_node_id=n)
                    neighbours.pop(node.node_id, None)
                    for node_id, peer in neighbours.items():
                        if first_choice(peer):
                            known[node_id] = peer
                        elif node_id not in known:
                            k.unreached[node_id] = peer
            ask_more()
    finally:
        for task in in_flight:
            task.cancel()
    stats.keys_unfinished = sum(not done(k) for k in states.values())
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("read of %d keys (%s, ...): %d unfinished, %d widened, %d calls (%d failed), "
                     "holders %s, table %d nodes, %d known, %d dialable, %.2f s", len(states), keys[:1],
                     stats.keys_unfinished, stats.keys_widened, stats.calls, stats.nodes_failed,
                     [len(k.holders) for k in states.values()], len(protocol.routing_table.uid_to_peer_id),
                     len(known), len(reachable), loop.time() - started)
    results: dict[str, object] = {}
    for key_id, k in states.items():
        k.state.finish_search()
        results[by_id[key_id]] = k.state.future.result()
    return results


async def _dialable(node: DHTNode) -> set[PeerID]:
    """Peers p2pd has addresses for: those it is connected to and those in the node's address book."""
    try:
        connected = {info.peer_id for info in await node.p2p.list_peers()}
    except Exception as e:  # p2pd busy or gone: the routing table alone, then
        logger.debug("listing p2pd's peers: %r", e)
        connected = set()
    book = getattr(node, "address_book", None)  # swarm.net.AddressBook, on nodes started by start_dht
    return connected | (book.peers() if book is not None else set())
