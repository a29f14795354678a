"""swarm.net: DHT nodes keep their routing tables whole (real hivemind nodes and p2pd daemons)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from swarm.net import (
    EVICT_AFTER_FAILURES,
    MAX_SUSPENSION_S,
    AddressBook,
    CappedBlacklist,
    NodeSettings,
    remember_addrs,
    start_dht,
    start_p2p,
    stop_node,
    visible_maddrs,
)


async def _node(initial_peers=(), **fields):
    settings = NodeSettings(initial_peers=tuple(initial_peers), **fields)
    p2p = await start_p2p(settings)
    dht = await start_dht(p2p, settings)
    return p2p, dht


@contextlib.asynccontextmanager
async def _three_nodes(refresh_s: float | None, third_is_client: bool = False):
    """A first node and two that join through it (the third in client mode if asked); all stopped on exit."""
    nodes = []
    try:
        nodes.append(await _node(routing_refresh_s=refresh_s))
        first = [str(a) for a in await visible_maddrs(nodes[0][0])]
        nodes.append(await _node(first, routing_refresh_s=refresh_s))
        nodes.append(await _node(first, client_mode=third_is_client, routing_refresh_s=refresh_s))
        yield [dht for _, dht in nodes]
    finally:
        for p2p, dht in reversed(nodes):
            await stop_node(dht, p2p)


async def _within(wait_s: float, condition) -> bool:
    """Whether `condition()` comes true within `wait_s` (polled every 0.1 s)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def _relearns(refresh_s: float | None, wait_s: float) -> bool:
    """Three nodes; one of them forgets another (as hivemind does when an RPC goes unanswered); whether
    it knows it again within `wait_s`, without that node contacting it."""
    async with _three_nodes(refresh_s) as nodes:
        table = nodes[1].protocol.routing_table
        forgotten = nodes[2].node_id
        deadline = time.monotonic() + 10
        while forgotten not in table and time.monotonic() < deadline:  # it learns of the third at its start
            await nodes[1].find_nearest_nodes([forgotten])
        assert forgotten in table
        del table[forgotten]
        return await _within(wait_s, lambda: forgotten in table)


@pytest.mark.parametrize("refresh_s, expected", [(1.0, True), (None, False)])
def test_a_node_relearns_a_forgotten_neighbour_by_refreshing_its_table(refresh_s, expected):
    assert asyncio.run(asyncio.wait_for(_relearns(refresh_s, wait_s=6.0), 60)) is expected


async def _refills(refresh_s: float | None, wait_s: float) -> bool:
    """A client's node (no one contacts it) loses every node of its table and has its one neighbour
    suspended; whether its table holds a node again within `wait_s`."""
    async with _three_nodes(refresh_s, third_is_client=True) as nodes:
        client = nodes[2]
        table = client.protocol.routing_table
        assert len(table.uid_to_peer_id) >= 1
        for node_id in list(table.uid_to_peer_id):
            del table[node_id]
        client.blacklist.register_failure(nodes[0].peer_id)
        # the initial peer, then the node it knows
        return await _within(wait_s, lambda: len(table.uid_to_peer_id) >= 2)


@pytest.mark.parametrize("refresh_s, expected", [(1.0, True), (None, False)])
def test_a_node_with_an_empty_table_refills_it_through_its_initial_peers(refresh_s, expected):
    assert asyncio.run(asyncio.wait_for(_refills(refresh_s, wait_s=6.0), 60)) is expected


def test_a_suspension_never_exceeds_the_cap():
    from hivemind.p2p import PeerID
    from hivemind.utils.timed_storage import get_dht_time

    blacklist = CappedBlacklist(5.0, 2.0)
    peer = PeerID(b"\x00\x01" + bytes(32))
    for _ in range(20):  # each failure after the last suspension ran out
        blacklist.banned_peers.clear()
        blacklist.register_failure(peer)
    assert peer in blacklist
    until = blacklist.banned_peers.get(peer).expiration_time
    assert until - get_dht_time() <= MAX_SUSPENSION_S + 1


async def _reaches_unannounced_node(learn: bool) -> tuple[bool, int]:
    """A client's node calls a DHT node its p2pd never heard of (as when a lookup's answer names a peer
    by id only). (whether the call is answered, how many dials the client's p2pd got) after the
    client learned that node's addresses from a record (learn) or not."""
    nodes = []
    try:
        nodes.append(await _node())
        first = [str(a) for a in await visible_maddrs(nodes[0][0])]
        nodes.append(await _node(first, client_mode=True))
        nodes.append(await _node())  # joined to no one: nothing can tell the client where it is
        client, stranger = nodes[1][1], nodes[2][1]
        book = client.address_book
        dials = []
        real_connect = book._connect

        async def counted(peer, addrs):
            dials.append(peer)
            await real_connect(peer, addrs)

        book._connect = counted
        if learn:
            remember_addrs(client, {0: {stranger.peer_id.to_base58(): _Addressed(
                tuple(str(a) for a in await visible_maddrs(stranger.p2p)))}})
        answers = await asyncio.gather(*(client.protocol.call_find(stranger.peer_id, [client.node_id])
                                         for _ in range(3)))
        again = await client.protocol.call_ping(stranger.peer_id)  # within redial_s: no second dial
        return all(a is not None for a in answers) and again is not None, len(dials)
    finally:
        for p2p, dht in reversed(nodes):
            await stop_node(dht, p2p)


class _Addressed:
    def __init__(self, addrs):
        self.addrs = addrs


@pytest.mark.parametrize("learn, expected", [(True, (True, 1)), (False, (False, 0))])
def test_a_client_node_reaches_a_node_whose_record_addresses_it_read(learn, expected):
    assert asyncio.run(asyncio.wait_for(_reaches_unannounced_node(learn), 60)) == expected


def test_the_address_book_keeps_only_the_latest_peers():
    from hivemind.p2p import PeerID

    class Node:  # what AddressBook reads of a DHTNode
        p2p = peer_id = None
        protocol = type("Protocol", (), {"wait_timeout": 1.0, "call_ping": None, "call_store": None,
                                         "call_find": None})()

    book = AddressBook(Node(), capacity=2)
    ids = [PeerID(b"\x00\x01" + bytes([i]) * 32) for i in range(3)]
    for peer in ids:
        book.learn(peer.to_base58(), ["/ip4/10.0.0.1/tcp/1"])
    book.learn(ids[0].to_base58(), [])  # no addresses: nothing learned, nothing forgotten
    assert [book.known(p) for p in ids] == [None, ("/ip4/10.0.0.1/tcp/1",), ("/ip4/10.0.0.1/tcp/1",)]


async def _failures_before_eviction() -> list[bool]:
    """Three nodes; the third stops. Whether the second still has it in its table after each of four calls
    to it that fail."""
    async with _three_nodes(refresh_s=None) as nodes:
        table = nodes[1].protocol.routing_table
        gone = nodes[2]
        deadline = time.monotonic() + 10
        while gone.node_id not in table and time.monotonic() < deadline:
            await nodes[1].find_nearest_nodes([gone.node_id])
        assert gone.node_id in table
        await gone.shutdown()
        await gone.p2p.shutdown()
        kept = []
        for _ in range(EVICT_AFTER_FAILURES + 1):
            assert await nodes[1].protocol.call_find(gone.peer_id, [gone.node_id]) is None
            await asyncio.sleep(0.1)  # the table is updated in a task
            kept.append(gone.node_id in table)
        return kept


def test_a_node_leaves_the_table_only_after_several_unanswered_calls():
    kept = asyncio.run(asyncio.wait_for(_failures_before_eviction(), 90))
    assert kept == [True] * (EVICT_AFTER_FAILURES - 1) + [False, False]


async def _calls_after_a_late_answer(guarded: bool) -> bool:
    """Two p2pd nodes; the second, on an event loop of its own thread, answers a unary call (what every DHT
    RPC is) only once the first's loop is blocked; the call's timeout and the answer then reach the first
    loop in the same turn, so the answer comes for a future its timeout has just cancelled. Whether the
    first node can still make a call afterwards. `guarded=False`: hivemind's ControlClient as it is."""
    import threading

    answering, release = threading.Event(), threading.Event()

    async def handler(data: bytes, _peer) -> bytes:
        answering.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return data

    caller = await start_p2p(NodeSettings())
    if not guarded:
        control = caller._client.control
        control._pending_calls = dict(control._pending_calls)  # as hivemind made it
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    thread.start()

    def on_other(coro, timeout_s: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, other_loop).result(timeout_s)

    try:
        addrs = [str(a) for a in await visible_maddrs(caller)]
        callee = on_other(start_p2p(NodeSettings(initial_peers=tuple(addrs))))
        on_other(callee._client.add_unary_handler("echo", handler))

        async def call(timeout_s: float) -> bytes | None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    return await caller._client.call_unary_handler(callee.peer_id, "echo", b"x")
            return None

        timeout_s = 3.0
        deadline = time.monotonic() + timeout_s
        late = asyncio.create_task(call(timeout_s))
        reached = await _within(timeout_s, answering.is_set)
        assert reached, "the call reached the handler only after its timeout"
        release.set()
        # the answer arrives and the timeout passes while this loop is blocked
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.5)
        assert await late is None
        answering.clear()
        return await call(5.0) == b"x"
    finally:
        release.set()
        if "callee" in locals():
            on_other(callee.shutdown())
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join(5)
        other_loop.close()
        await caller.shutdown()


@pytest.mark.parametrize("guarded, expected", [(True, True), (False, False)])
def test_an_answer_to_a_call_that_timed_out_leaves_the_node_able_to_call(guarded, expected):
    assert asyncio.run(asyncio.wait_for(_calls_after_a_late_answer(guarded), 60)) == expected
