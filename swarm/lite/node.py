"""LiteNode: the asyncio face of swarm.lite (a py-libp2p host on its own trio thread, and a DHT reader).

What the client's LiteTransport and the health crawler need from the network, without hivemind:
  * `dht` (LiteDHT): swarm.records' readers (fetch_blocks, fetch_models, ...) run on it unchanged: the
    swarm's records come through the DHT's own find RPC (swarm.lite.dht), with the checks hivemind's
    path applies (owner signatures, then the schema), then records' own decoding;
  * `open_stream`: a libp2p stream to a peer's handler (noise + yamux, as p2pd speaks), as an asyncio
    (reader, writer) pair, so swarm.protocol's framing runs on it unchanged;
  * `request_info`: swarm.probe.request_info's probe (the health crawler passes a LiteNode as both its
    `dht` and its `p2p`).

Public swarms only for now: a private swarm's DHT demands hivemind's signed access tokens on every RPC
(swarm.admission.SwarmAuthorizer), which this reader does not speak; `start` asks the initial peers
whether the swarm is private (swarm.admission's ADMISSION_HANDLER) and says so instead of finding nothing.

Contract: `start` raises ConfigError when no initial peer can be reached; `open_stream` raises PeerError
(unreachable, no answer in time) or VersionMismatch (the peer does not speak that handler); DHT reads
never raise for a peer's failure (an unanswered key reads as empty). `shutdown` stops the trio thread
and every stream on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from swarm import records
from swarm.admit import ADMISSION_HANDLER, ERROR_PRIVATE
from swarm.errors import ConfigError, NotAdmitted, PeerError, PeerRefused, ProtocolError, VersionMismatch
from swarm.lite.bridge import TrioThread
from swarm.lite.dht import BEAM_SIZE, DHTReader
from swarm.peerid import peer_id_of_public_key
from swarm.protocol import INFO_HANDLER, read_message, write_message

logger = logging.getLogger(__name__)

RSA_KEY_BITS = 2048  # as swarm.identity's: a hivemind peer sees an ordinary RSA peer id
ADMISSION_BYTES = 4096
MAX_INFO_BYTES = 64 * 1024  # as swarm.probe's: an info reply is < 2 KiB


def parse_initial_peers(initial_peers: Sequence[str]) -> dict[str, list[str]]:
    """{peer id: [its addresses]} of multiaddrs ending in /p2p/<id>; ConfigError for one without."""
    found: dict[str, list[str]] = {}
    for addr in initial_peers:
        head, sep, peer_id = addr.rpartition("/p2p/")
        if not sep or not peer_id or "/" in peer_id:
            raise ConfigError(f"initial peer {addr!r} does not end in /p2p/<peer id>; copy the bootstrap's "
                              "full multiaddr")
        found.setdefault(peer_id, []).append(head)
    return found


class LiteNode:
    """One py-libp2p host (client only: it listens nowhere) and a DHT reader over it."""

    def __init__(self, bridge: TrioThread, host, initial: dict[str, list[str]], key: rsa.RSAPrivateKey):
        self.bridge = bridge
        self.host = host
        self.key = key
        self.peer_id = peer_id_of_public_key(key.public_key())
        self.initial = initial
        self._addrs: dict[str, list[str]] = {pid: list(a) for pid, a in initial.items()}  # from records
        self.reader = DHTReader(self._call_unary, self.addrs_of, self._find_addrs, initial)
        self.dht = LiteDHT(self.reader)  # what swarm.records reads through, as through a DHTNode

    @classmethod
    async def start(cls, initial_peers: Sequence[str], timeout_s: float = 30.0,
                    key: rsa.RSAPrivateKey | None = None) -> LiteNode:
        """Start the host and connect to the initial peers (at least one must answer)."""
        initial = parse_initial_peers(initial_peers)
        if not initial:
            raise ConfigError("the lite transport needs --initial-peers (a bootstrap node's multiaddr)")
        key = key or rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        bridge = TrioThread()
        await bridge.start()
        try:
            host = await bridge.call(_make_host, key)
            await bridge.start_task(host.run)
            node = cls(bridge, host, initial, key)
            await node._join(timeout_s)
        except BaseException:
            await bridge.stop()
            raise
        return node

    async def _join(self, timeout_s: float) -> None:
        results = await asyncio.gather(*(self._ask_admission(pid, addrs, timeout_s)
                                         for pid, addrs in self.initial.items()), return_exceptions=True)
        for result in results:
            if isinstance(result, NotAdmitted | ConfigError):
                raise result
        if all(isinstance(r, BaseException) for r in results):
            raise ConfigError(f"could not reach any initial peer {sorted(self.initial)}: {results[0]}; "
                              "check the addresses (the lite transport dials TCP multiaddrs only)")

    async def _ask_admission(self, peer_id: str, addrs: list[str], timeout_s: float) -> None:
        """Connect to an initial peer and ask whether the swarm is private (swarm.admission)."""
        try:
            reader, writer = await self.open_stream(peer_id, addrs, ADMISSION_HANDLER, timeout_s)
        except VersionMismatch:  # older software without the handler: a public swarm
            return
        try:
            await write_message(writer, {"type": "admission"})
            reply = await asyncio.wait_for(read_message(reader, ADMISSION_BYTES), timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            raise PeerError(f"no admission answer: {e!r}", peer=peer_id) from e
        finally:
            writer.close()
        refused = reply.get("type") == "error" and reply.get("code") == ERROR_PRIVATE
        if refused or reply.get("private") is True:
            raise ConfigError("this swarm is private; the lite transport reads public swarms only (a private "
                              "swarm's DHT needs hivemind's signed access tokens): use transport='hivemind'")

    # ------------------------------------------------------------ the DHT

    def addrs_of(self, peer_id: str) -> list[str]:
        return self._addrs.get(peer_id, [])

    def remember(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Addresses a record announces for `peer_id` (where DHT nodes and streams dial it)."""
        if addrs:
            self._addrs[peer_id] = list(addrs)[: records.MAX_ADDRS]

    async def _call_unary(self, peer_id: str, addrs: Sequence[str], proto: str, data: bytes,
                          timeout_s: float) -> bytes:
        return await self.bridge.call(self.host.call_unary, peer_id, list(addrs), proto, data, timeout_s)

    async def _find_addrs(self, via: str, peer_id: str, timeout_s: float) -> list[str]:
        known = await self.bridge.call(_known_addrs, self.host, peer_id)
        if known:
            return known
        return await self.bridge.call(self.host.find_node_addrs, via, peer_id, timeout_s)

    async def get_many(self, keys: Sequence[str], timeout_s: float, latest: bool = True) -> dict[str, dict]:
        """{key: {subkey: (unpacked value, expiration)}} (swarm.lite.dht.DHTReader.get_many)."""
        if not keys:
            return {}
        return await self.reader.get_many(keys, timeout_s, latest)

    async def fetch_blocks(self, model_id: str, num_blocks: int,
                           **options) -> dict[int, dict[str, records.BlockRecord]]:
        """records.fetch_blocks on this node (same options); remembers every record's addresses."""
        found = await records.fetch_blocks(self.dht, model_id, num_blocks, **options)
        for block_records in found.values():
            for peer_id, record in block_records.items():
                self.remember(peer_id, record.addrs)
        return found

    async def fetch_models(self, **options) -> list[records.ModelRecord]:
        """records.fetch_models on this node."""
        return await records.fetch_models(self.dht, **options)

    # ------------------------------------------------------------ streams

    async def open_stream(self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A libp2p stream to `handler` of `peer_id` (dialing `addrs`, or its remembered addresses)."""
        try:
            dial = list(addrs or self.addrs_of(peer_id))
            stream = await self.bridge.call(self.host.new_stream, peer_id, dial, handler, timeout_s)
        except LookupError as e:
            raise VersionMismatch(f"peer {peer_id} does not speak {handler} ({e})") from None
        except ConnectionError as e:  # the trio loop has stopped
            raise PeerError(f"could not open {handler}: {e}", peer=peer_id) from None
        return self.bridge.open_streams(stream, peername=peer_id)

    async def request_info(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> dict:
        """swarm.probe.request_info on this node: connect, ask `info`, return the reply, all within
        `timeout_s`. PeerError (unreachable, silent), PeerRefused (an error reply), ProtocolError (not
        an info reply)."""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await self.open_stream(peer_id, addrs, INFO_HANDLER, timeout_s)
                try:
                    await write_message(writer, {"type": "info"})
                    reply = await read_message(reader, MAX_INFO_BYTES)
                finally:
                    writer.close()
        except TimeoutError:
            raise PeerError(f"no answer to info within {timeout_s:g} s", peer=peer_id) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerError(f"stream closed during info: {e}", peer=peer_id) from e
        if reply.get("type") == "error":
            raise PeerRefused(f"info refused: {str(reply.get('message'))[:200]}", peer=peer_id)
        if reply.get("type") != "info":
            kind = str(reply.get("type"))[:40]
            raise ProtocolError(f"peer {peer_id} answered info with a {kind!r} message")
        return reply

    async def shutdown(self) -> None:
        await self.bridge.stop()


class _Item:
    """A value with its expiration, as hivemind's ValueWithExpiration (what records._decode_entries reads)."""

    __slots__ = ("value", "expiration_time")

    def __init__(self, value, expiration_time: float):
        self.value, self.expiration_time = value, expiration_time


class LiteDHT:
    """The one DHTNode method swarm.records reads through, on a DHTReader: `get_many(keys,
    sufficient_expiration_time, beam_size, return_futures=True)`, each key's future resolving to None or to a
    dictionary value {subkey: item(value, expiration_time)}. So records.fetch_blocks, fetch_models and
    every later reader in records run unchanged on the lite backend, with the same decoding.

    One search serves all keys; it stops at `search_timeout_s`, under the bounds records and the health
    crawler wait with (5 s and more), so what it found comes back before they give up on it."""

    def __init__(self, reader: DHTReader, search_timeout_s: float = 4.0):
        self.reader = reader
        self.search_timeout_s = search_timeout_s

    async def get_many(self, keys: Sequence[str], sufficient_expiration_time: float | None = None,
                       beam_size: int | None = None, return_futures: bool = False):
        latest = sufficient_expiration_time is not None
        search = asyncio.ensure_future(self.reader.get_many(list(keys), self.search_timeout_s, latest,
                                                            beam_size or BEAM_SIZE))
        futures = {key: asyncio.get_running_loop().create_future() for key in keys}

        def resolve(done: asyncio.Future) -> None:
            found = done.result() if not done.cancelled() and done.exception() is None else {}
            for key, future in futures.items():
                if not future.done():
                    items = found.get(key)
                    value = {sub: _Item(v, exp) for sub, (v, exp) in items.items()} if items else None
                    future.set_result(None if value is None else _Item(value, max(i.expiration_time
                                                                                  for i in value.values())))

        search.add_done_callback(resolve)
        if return_futures:
            return futures
        await asyncio.wait(futures.values())
        return {key: future.result() for key, future in futures.items()}


async def _make_host(key: rsa.RSAPrivateKey):
    from swarm.lite.host import LiteHost  # imports py-libp2p: on the trio thread, once

    return LiteHost(key)


async def _known_addrs(host, peer_id: str) -> list[str]:
    return host.known_addrs(peer_id)
