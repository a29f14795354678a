"""Start hivemind's P2P daemon and a DHT node inside the calling event loop, with no orphans.

`hivemind.DHT` runs its node in a forked child that outlives a kill -9 of its parent (with its p2pd), so
a restart with the same identity fails with "already taken". Here the DHT node runs in our own event
loop, and p2pd gets a parent-death signal, so a crashed peer leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import itertools
import logging
import math
import os
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.dht.node import Blacklist, DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from swarm.admission import SwarmAuthorizer, SwarmP2P, check_swarm, serve_admission
from swarm.errors import ConfigError
from swarm.records import BlockRecord
from swarm.swarmkey import SwarmKey

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# hivemind logs every identity check and daemon start at INFO; our own lines say what matters
logging.getLogger("hivemind.p2p.p2p_daemon").setLevel(logging.WARNING)
# set while start_p2p runs (context variables follow the tasks it creates): subprocesses that asyncio
# spawns then get a parent-death signal; every other subprocess of the process is left alone
_die_with_us: contextvars.ContextVar[bool] = contextvars.ContextVar("swarm_die_with_us", default=False)


def _die_with_parent() -> None:  # runs in the forked child before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) reaches us, not p2pd,
    # so a leaving peer can still announce "offline" through it; it dies with us all the same.
    os.setpgid(0, 0)


def _install_spawn_hook() -> None:
    """Wrap asyncio's create_subprocess_exec once per process (safe from any thread or event loop)."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_swarm_hook", False):
        return

    async def spawn(*args, **kwargs):
        if _die_with_us.get():
            kwargs.setdefault("preexec_fn", _die_with_parent)
        return await original(*args, **kwargs)

    spawn._swarm_hook = True
    asyncio.subprocess.create_subprocess_exec = spawn


@dataclass
class NodeSettings:
    initial_peers: Sequence[str] = ()
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: Sequence[str] = ()
    identity_path: str | None = None
    # whether p2pd first checks that no running node holds this identity (hivemind starts a second, anonymous
    # daemon that joins through the initial peers and dials it: seconds on a slow link). Pointless for an
    # identity made a moment ago for this process (swarm.identity's ephemeral ones, as clients use).
    check_identity_free: bool = True
    client_mode: bool = False
    startup_timeout_s: float = 30.0
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm.admission); None = a public swarm
    # how often the DHT node looks itself and a random id up, to learn the nodes its table lost (see
    # _refresh_routing); None: never
    routing_refresh_s: float | None = 30.0


# p2pd tries its initial peers once per start (a try took ~6-8 s to fail against a busy bootstrap node in
# the scale harness): start it again while the start-up time lasts
BOOTSTRAP_RETRY_S = 1.0


async def start_p2p(settings: NodeSettings) -> P2P:
    """Start p2pd (dies with this process). Raises ConfigError with advice on the usual failures.

    With a swarm key, every stream it opens or serves is gated (swarm.admission.SwarmP2P). A node that
    listens answers "is this swarm private?" (ADMISSION_HANDLER) for nodes that join through it."""
    host_maddr = f"/ip4/{settings.host}/tcp/{settings.port}" if ":" not in settings.host else (
        f"/ip6/{settings.host}/tcp/{settings.port}"
    )
    kwargs = dict(
        initial_peers=list(settings.initial_peers),
        host_maddrs=[] if settings.client_mode else [host_maddr],
        announce_maddrs=list(settings.announce_maddrs) or None,
        identity_path=settings.identity_path,
        check_if_identity_free=settings.check_identity_free,
    )
    if settings.client_mode:
        kwargs["host_maddrs"] = ["/ip4/127.0.0.1/tcp/0"]
    _install_spawn_hook()
    token = _die_with_us.set(True)
    deadline = time.monotonic() + settings.startup_timeout_s
    try:
        for attempt in itertools.count(1):
            try:
                # each try within what is left of the start-up time (a try near its end may still take 5 s)
                left_s = max(deadline - time.monotonic(), 5.0)
                p2p = await SwarmP2P.create(**kwargs, startup_timeout=left_s)
                break
            except Exception as e:  # p2pd reports failures as bare exceptions with its own text
                # a busy bootstrap node or a lossy link deserves another try (the scale harness's clients
                # met it on a loaded machine)
                if "bootstrap peers" not in str(e) or time.monotonic() + BOOTSTRAP_RETRY_S > deadline:
                    raise ConfigError(_explain_p2p_failure(e, settings)) from e
                logger.warning("could not reach the initial peers (try %d); trying again for %.0f s more",
                               attempt, deadline - time.monotonic())
                await asyncio.sleep(BOOTSTRAP_RETRY_S)
    finally:
        _die_with_us.reset(token)
    _guard_unary_calls(p2p)
    p2p.swarm_key = settings.swarm_key
    if not settings.client_mode:
        await serve_admission(p2p)
    return p2p


class _CallsInFlight(dict):
    """hivemind's ControlClient keeps a future per unary call in flight (every DHT RPC is one) and the
    task that reads p2pd's persistent connection sets it when the answer comes: `if call_id in calls:
    calls[call_id].set_result(...)`. A call that timed out has its future cancelled a moment before its
    own cleanup removes it; an answer that arrives in that moment made set_result raise InvalidStateError,
    which ended the reading task. From then on the node heard no answer to any DHT call and answered no
    DHT request, for good: its routing table emptied, its announces reached nobody, and its records
    vanished from every reader while it went on serving (seen in the full test suite under load). Here a
    call whose future is done is no longer in flight, so a late answer is dropped as hivemind drops one for
    a call it already forgot. Tied to hivemind 1.1.12's ControlClient (pinned in pyproject.toml)."""

    def __contains__(self, call_id) -> bool:
        future = self.get(call_id)
        return future is not None and not future.done()


def _guard_unary_calls(p2p: P2P) -> None:
    control = p2p._client.control
    control._pending_calls = _CallsInFlight(control._pending_calls)


def _explain_p2p_failure(error: Exception, settings: NodeSettings) -> str:
    text = str(error)
    if "address already in use" in text.lower():
        return f"port {settings.port} on {settings.host} is in use; pick another --port (or 0 for any)"
    if "taken" in text.lower():
        return f"identity {settings.identity_path} is already in use by a running process; stop it first"
    if "bootstrap" in text.lower() or "initial" in text.lower() or "connect" in text.lower():
        return f"could not reach the initial peers {list(settings.initial_peers)}: {text}; check the addresses"
    return f"could not start the libp2p daemon: {text}"


async def start_dht(
    p2p: P2P,
    settings: NodeSettings,
    validator: RecordValidatorBase | None = None,
) -> DHTNode:
    """A DHT node in this event loop over `p2p`. In a private swarm (settings.swarm_key) its RPCs carry and
    demand the key's tokens (swarm.admission.SwarmAuthorizer). Raises NotAdmitted / ConfigError when the
    initial peers refuse our key or our lack of one (swarm.admission.check_swarm)."""
    key = settings.swarm_key
    await check_swarm(p2p, settings.initial_peers, min(settings.startup_timeout_s / 3, 5.0))
    try:
        node = await asyncio.wait_for(
            DHTNode.create(
                p2p=p2p,
                initial_peers=list(settings.initial_peers),
                client_mode=settings.client_mode,
                record_validator=validator,
                authorizer=SwarmAuthorizer(key) if key is not None else None,
                num_workers=4,
                # hivemind re-reads every cached key in the background shortly before it expires; we read
                # fresh records when we need them, so that refresh is only traffic (every reader, every key)
                cache_refresh_before_expiry=0,
            ),
            timeout=settings.startup_timeout_s,
        )
    except TimeoutError:
        raise ConfigError(
            f"could not join the DHT through {list(settings.initial_peers)} within {settings.startup_timeout_s} s; "
            "is the bootstrap node running and reachable?"
        ) from None
    node.blacklist = CappedBlacklist(node.blacklist.base_time, node.blacklist.backoff)
    _evict_after_failures(node.protocol, EVICT_AFTER_FAILURES)
    # the node carries its book: remember_addrs fills it, swarm.dhtread asks the nodes in it (without
    # importing this module)
    node.address_book = AddressBook(node)
    if settings.routing_refresh_s:
        _refreshing[node] = asyncio.create_task(
            _refresh_routing(node, settings.routing_refresh_s, list(settings.initial_peers)),
            name="dht-routing-refresh")
    return node


MAX_SUSPENSION_S = 60.0
EVICT_AFTER_FAILURES = 3


def _evict_after_failures(protocol, limit: int) -> None:
    """Drop a node from `protocol`'s routing table only after `limit` calls in a row went unanswered.

    hivemind drops it on the first: on a loaded machine or a slow link every node misses an answer now and
    then, and in the scale harness a reader's table emptied so (a monitor's went from 13 nodes to none)
    and its reads went blind. Kademlia keeps a node through a few failures for this reason.
    A node that did not answer is still skipped for a while by every lookup (the blacklist's suspension),
    so keeping it in the table costs nothing until it is tried again."""
    table = protocol.routing_table
    original = protocol.update_routing_table
    failures: dict[DHTID, int] = {}

    async def update_routing_table(node_id: DHTID | None, peer_id: PeerID, responded: bool = True) -> None:
        node_id = node_id if node_id is not None else table.get(peer_id=peer_id)
        if responded:
            failures.pop(node_id, None)
        elif node_id is not None and node_id in table:
            failures[node_id] = failures.get(node_id, 0) + 1
            if failures[node_id] < limit:
                return
            del failures[node_id]
        if len(failures) > 4 * len(table.uid_to_peer_id) + 64:  # nodes that left the table by other ways
            for stale in [n for n in failures if n not in table]:
                del failures[stale]
        await original(node_id, peer_id, responded)

    protocol.update_routing_table = update_routing_table


class CappedBlacklist(Blacklist):
    """hivemind's suspension of nodes that did not answer (the first for 5 s, each further one twice as
    long), capped at MAX_SUSPENSION_S. Uncapped, a node that missed ten answers on a loaded machine or a
    slow link is skipped by every lookup for 85 minutes, though it is alive and in others' tables, and the
    skipping node's view of the swarm shrinks for good."""

    def register_failure(self, peer: PeerID) -> None:
        if peer not in self.banned_peers and self.base_time > 0:
            failures = self.ban_counter[peer]
            suspension = min(self.base_time * self.backoff**failures, MAX_SUSPENSION_S)
            self.banned_peers.store(peer, failures, expiration_time=get_dht_time() + suspension)
            self.ban_counter[peer] = failures + 1


_refreshing: dict[DHTNode, asyncio.Task] = {}  # each started node's refresh task (stop_node ends it)


async def _refresh_routing(node: DHTNode, period_s: float, initial_peers: list[str]) -> None:
    """Every ~period_s, look up this node's own id and a random one. A node leaves the routing table
    after a few RPCs it did not answer in time (_evict_after_failures), and hivemind learns nodes only from
    its own lookups and from nodes that contact it; its own bucket refresh (refresh_timeout) fails in
    hivemind 1.1.12 (it passes one id where a list goes). Without this, a node that joined early or lost
    neighbours to timeouts (the bootstrap and a monitor under load) keeps a table of a few nodes, lookups
    through it end there, and readers get part of every block's records: the scale harness at 30 peers saw
    14 of 30 after 5 minutes, its reads contacting one node. A lookup visits up to bucket_size nodes and
    adds each that answers.

    A lookup starts from the table itself, so a table that lost (nearly) every node cannot refill that way:
    a client's node, which no one contacts, then reads only its own cache. Below half a bucket the node
    pings its initial peers again first (each that answers goes back in the table)."""
    while node.is_alive:
        await asyncio.sleep(period_s * random.uniform(0.75, 1.25))  # spread out, not every node at once
        try:
            if len(node.protocol.routing_table.uid_to_peer_id) < node.protocol.bucket_size // 2:
                await asyncio.wait_for(_ping_initial_peers(node, initial_peers), period_s / 2)
            await asyncio.wait_for(node.find_nearest_nodes([node.node_id, DHTID.generate()]), period_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a lost round: the next one tries again
            logger.debug("routing-table refresh: %r", e)


async def _ping_initial_peers(node: DHTNode, initial_peers: list[str]) -> None:
    """Ping each initial peer (its address told to p2pd again first); one that answers joins the table."""
    async def ping(maddr: str) -> None:
        peer_id = PeerID.from_base58(Multiaddr(maddr)["p2p"])
        if peer_id == node.peer_id:
            return
        try:
            await connect(node.p2p, peer_id, [maddr], node.protocol.wait_timeout)
        except Exception as e:  # p2pd may still reach it through an address it learned itself
            logger.debug("connecting to initial peer %s: %r", maddr, e)
        node.blacklist.register_success(peer_id)  # asked for by name: not skipped as suspended
        await node.protocol.call_ping(peer_id)

    await asyncio.gather(*(ping(m) for m in initial_peers), return_exceptions=True)


class AddressBook:
    """Where this node's p2pd can dial the peers whose records it read, told to p2pd before the node's
    first DHT call to each.

    hivemind's DHT answers name the nearest nodes by peer id only; p2pd then looks the address up in its
    own libp2p DHT: a lookup before the call, and no call at all where that DHT does not know the peer or
    dropped its addresses (libp2p drops those it counts as unroutable, such as 198.18.0.0/15, where the
    scale harness once ran: every call its monitor made to a node other than the bootstrap failed with
    "routing: not found"). Bounded: the `capacity` peers learned last; a peer is dialed again at most
    every `redial_s` (a dial that fails costs a call up to the protocol's wait_timeout)."""

    def __init__(self, node: DHTNode, capacity: int = 4096, redial_s: float = 60.0):
        self.p2p = node.p2p
        self.own_id = node.peer_id
        self.timeout_s = node.protocol.wait_timeout
        self.capacity = capacity
        self.redial_s = redial_s
        self._addrs: OrderedDict[PeerID, tuple[str, ...]] = OrderedDict()
        self._dialed: dict[PeerID, float] = {}  # peer -> when last dialed (time.monotonic)
        self._dialing: dict[PeerID, asyncio.Task] = {}
        protocol = node.protocol
        for name in ("call_ping", "call_store", "call_find"):
            setattr(protocol, name, self._dialing_first(getattr(protocol, name)))

    def learn(self, peer_id: str, addrs: Sequence[str]) -> None:
        if not addrs:
            return
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception:  # a record's key names its peer; a bad one was refused before it got here
            return
        if peer == self.own_id:  # our own records: p2pd would dial itself
            return
        addrs = tuple(addrs)
        if self._addrs.get(peer) != addrs:
            self._dialed.pop(peer, None)  # new addresses: dial them on the next call
        self._addrs[peer] = addrs
        self._addrs.move_to_end(peer)
        while len(self._addrs) > self.capacity:
            old, _ = self._addrs.popitem(last=False)
            self._dialed.pop(old, None)

    def known(self, peer: PeerID) -> tuple[str, ...] | None:
        return self._addrs.get(peer)

    def peers(self) -> set[PeerID]:
        return set(self._addrs)

    def _dialing_first(self, call):
        async def wrapped(peer: PeerID, *args, **kwargs):
            await self.dial(peer)
            return await call(peer, *args, **kwargs)

        return wrapped

    async def dial(self, peer: PeerID) -> None:
        """Tell p2pd `peer`'s addresses (connect) unless done in the last redial_s or not known. Never
        raises: the call that follows fails as it would have."""
        task = self._dialing.get(peer)
        if task is None:
            addrs = self._addrs.get(peer)
            if addrs is None or time.monotonic() - self._dialed.get(peer, -math.inf) < self.redial_s:
                return
            self._dialed[peer] = time.monotonic()
            task = self._dialing[peer] = asyncio.create_task(self._connect(peer, addrs))
            task.add_done_callback(lambda _: self._dialing.pop(peer, None))
        await asyncio.shield(task)

    async def _connect(self, peer: PeerID, addrs: tuple[str, ...]) -> None:
        try:
            await connect(self.p2p, peer, addrs, self.timeout_s)
        except Exception as e:  # gone, or unreachable there: the DHT call reports it
            logger.debug("dialing %s at %s: %r", peer, addrs, e)


def remember_addrs(node: DHTNode, found: dict[int, dict[str, BlockRecord]]) -> None:
    """Give `node`'s address book the addresses of the records a read returned (records.fetch_blocks);
    nothing for a node not started by start_dht."""
    book = getattr(node, "address_book", None)
    if book is None:
        return
    for block_records in found.values():
        for peer_id, record in block_records.items():
            book.learn(peer_id, record.addrs)


async def visible_maddrs(p2p: P2P) -> list[str]:
    return [str(m) for m in await p2p.get_visible_maddrs()]


async def connect(p2p: P2P, peer_id: PeerID, addrs: Sequence[str], timeout_s: float) -> None:
    """Tell our p2pd where a peer can be dialed (from its DHT record) and connect."""
    # p2pd wants transport addresses; a trailing /p2p/<id> component breaks its decoder
    maddrs = [Multiaddr(a.split("/p2p/")[0]) for a in addrs]
    await asyncio.wait_for(p2p._client.connect(peer_id, maddrs), timeout=timeout_s)


STOP_TIMEOUT_S = 5.0


async def stop_node(dht: DHTNode | None, p2p: P2P | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Shut down a DHT node and its p2pd, each within `timeout_s`: hivemind waits forever for answers
    from a p2pd that already died (a signal sent to the whole process group), so a bounded wait it is."""
    refresh = _refreshing.pop(dht, None) if dht is not None else None
    if refresh is not None:
        refresh.cancel()
    for name, part in (("DHT node", dht), ("p2pd", p2p)):
        if part is None:
            continue
        try:
            await asyncio.wait_for(part.shutdown(), timeout_s)
        except Exception as e:  # gone already, or hung: we are leaving either way
            logger.warning("stopping the %s: %r", name, e)
