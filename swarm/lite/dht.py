"""Reading hivemind's DHT without hivemind: its find RPC, its value format, its checks, its search.

hivemind's DHT (hivemind/dht/protocol.py) is a Kademlia over p2pd: nodes serve `DHTProtocol.rpc_find`
(a unary protobuf call, swarm.lite.host) taking FindRequest{keys: 20-byte DHT ids} and answering, per
key, FindResult{type, value, expiration_time, nearest_node_ids, nearest_peer_ids}. A dictionary value
(all of swarm's keys) comes as msgpack ExtType(0x50, msgpack([maxsize, latest_expiration, [[subkey,
value, expiration], ...]])), each value being the record's msgpack with the owner's signature appended.

What a hivemind client node does with an answer, this does too (DHTProtocol.call_find and
_SearchState): every entry of a node's dictionary must pass the record validators (the owner signature,
swarm.signatures, then the swarm schema, records.check_stored), or that node's whole dictionary for the
key is dropped; dictionaries from several nodes merge per subkey, the later expiration winning; the
signature is stripped and the value unpacked. A regular (non-dictionary) value under a swarm key is
ignored: no swarm node stores one.

The search (`DHTReader.get_many`) is a beam search per key over XOR distance, as hivemind's
traverse_dht: it starts at the initial peers, and asks the `ALPHA` nearest unasked nodes of each key's
beam (the BEAM_SIZE nearest nodes known) until the beam holds no unasked node; `latest=False` stops a
key at its first value. One rpc_find carries every key a node is asked about. Nodes named by peer id
only are dialed at addresses the records, py-libp2p's peerstore or a Kademlia FIND_NODE to the node
that named them give.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgpack

from swarm import protos, records, signatures
from swarm.errors import ProtocolError, SwarmError
from swarm.peerid import peer_id_text

logger = logging.getLogger(__name__)

FIND_RPC = "DHTProtocol.rpc_find"
BEAM_SIZE = 20  # hivemind's default bucket_size, which its searches use as beam size
ALPHA = 3  # nodes asked per key per round
MAX_QUERIES = 256  # rpc_find calls per get_many, whatever the swarm claims
MAX_KEYS_PER_CALL = 1024
_DICTIONARY_EXT = 0x50  # hivemind's MSGPackSerializer code for DictionaryDHTValue
_TUPLE_EXT = 0x40


def _ext_hook(code: int, data: bytes):
    if code == _DICTIONARY_EXT:
        return ("dictionary", msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True))
    if code == _TUPLE_EXT:
        return tuple(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True))
    raise ProtocolError(f"unknown msgpack ext type {code}")


def parse_dictionary(value: bytes) -> list[tuple[object, bytes, float]]:
    """[(subkey, signed value bytes, expiration)] of a FOUND_DICTIONARY value; ProtocolError if malformed."""
    try:
        tag, body = msgpack.unpackb(value, ext_hook=_ext_hook, raw=False, strict_map_key=True)
        if tag != "dictionary":
            raise ValueError("not a dictionary")
        _maxsize, _latest, items = body
        entries = []
        for subkey, data, expiration in items:
            if type(data) is not bytes or type(expiration) not in (float, int) or type(expiration) is bool:
                raise ValueError("entry is not (subkey, bytes, expiration)")
            entries.append((subkey, data, float(expiration)))
        return entries
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise ProtocolError(f"DHT dictionary value is malformed: {e}") from None


def checked_dictionary(key_id: bytes, value: bytes) -> dict[object, tuple[bytes, float]] | None:
    """A node's dictionary for `key_id` if every entry passes the validators (module docstring), else None:
    {subkey: (signed value bytes, expiration)}."""
    try:
        entries = parse_dictionary(value)
    except ProtocolError as e:
        logger.debug("dropping a DHT answer: %s", e)
        return None
    checked = {}
    for subkey, data, expiration in entries:
        try:
            subkey_bytes = msgpack.packb(subkey, use_bin_type=True, strict_types=True)
        except (TypeError, ValueError):
            return None
        stripped = signatures.verify_and_strip(key_id, subkey_bytes, data, expiration)
        if stripped is None:
            logger.debug("dropping a DHT dictionary: entry %.60r has no valid owner signature", subkey)
            return None
        try:
            records.check_stored(key_id, subkey_bytes, stripped, expiration)
        except ProtocolError as e:
            logger.debug("dropping a DHT dictionary: entry %.60r: %s", subkey, e)
            return None
        checked[subkey] = (data, expiration)
    return checked


def unpack_entries(key_id: bytes, merged: dict[object, tuple[bytes, float]]) -> dict[object, tuple[object, float]]:
    """{subkey: (unpacked record map, expiration)}: signatures stripped, values unpacked (as hivemind
    hands them to records._decode_entries)."""
    out = {}
    for subkey, (data, expiration) in merged.items():
        subkey_bytes = msgpack.packb(subkey, use_bin_type=True, strict_types=True)
        stripped = signatures.verify_and_strip(key_id, subkey_bytes, data, expiration)
        if stripped is None:
            continue
        try:
            out[subkey] = (msgpack.unpackb(stripped, raw=False, strict_map_key=True), expiration)
        except (ValueError, TypeError, msgpack.exceptions.UnpackException):
            continue
    return out


@dataclass
class _Search:
    key: str
    key_id: bytes
    target: int
    known: dict[int, str] = field(default_factory=dict)  # node id -> peer id, every node heard of
    asked: set[str] = field(default_factory=set)  # peer ids asked about this key
    merged: dict[object, tuple[bytes, float]] = field(default_factory=dict)
    found: bool = False
    done: bool = False
    beam_size: int = BEAM_SIZE

    def add(self, dictionary: dict[object, tuple[bytes, float]]) -> None:
        now = time.time()
        for subkey, (data, expiration) in dictionary.items():
            if expiration < now:
                continue
            if subkey not in self.merged or self.merged[subkey][1] < expiration:
                self.merged[subkey] = (data, expiration)
            self.found = True

    def next_nodes(self) -> list[str]:
        """Up to ALPHA unasked peers among the beam_size nearest known nodes; [] = this search is over."""
        beam = sorted(self.known, key=lambda node: node ^ self.target)[: self.beam_size]
        return [self.known[node] for node in beam if self.known[node] not in self.asked][:ALPHA]


Call = Callable[[str, Sequence[str], str, bytes, float], Awaitable[bytes]]


class DHTReader:
    """get_many over hivemind's DHT through `call` (a unary call: peer, addrs, proto, data, timeout).

    `addrs_of(peer_id)` gives the addresses known for a peer (records, peerstore); `find_addrs(via,
    peer_id)` asks a node for another's addresses."""

    def __init__(self, call: Call, addrs_of: Callable[[str], list[str]],
                 find_addrs: Callable[[str, str, float], Awaitable[list[str]]], initial: dict[str, list[str]]):
        self.call = call
        self.addrs_of = addrs_of
        self.find_addrs = find_addrs
        self.initial = initial  # peer id -> addresses of the initial peers
        self.rpc_timeout_s = 5.0

    async def get_many(self, keys: Sequence[str], timeout_s: float, latest: bool = True,
                       beam_size: int = BEAM_SIZE) -> dict[str, dict[object, tuple[object, float]]]:
        """{key: {subkey: (unpacked value, expiration)}} for every key some node holds (keys whose search
        has not found anything by `timeout_s` come back empty)."""
        searches = {key: _Search(key, records.dht_key_id(key), int.from_bytes(records.dht_key_id(key), "big"),
                                 beam_size=max(1, beam_size)) for key in keys}
        deadline = time.monotonic() + timeout_s
        queries = 0
        named_by: dict[str, str] = {}  # peer id -> a node that named it (to ask for its addresses)
        pending: dict[str, list[_Search]] = {peer: list(searches.values()) for peer in self.initial}
        while pending and queries < MAX_QUERIES:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.debug("DHT search of %d keys stopped at its deadline", len(keys))
                break
            batch = list(pending.items())[: MAX_QUERIES - queries]
            queries += len(batch)
            for peer, group in batch:
                for search in group:
                    search.asked.add(peer)
            answers = await asyncio.gather(*(
                self._ask(peer, group, named_by.get(peer), min(left, self.rpc_timeout_s)) for peer, group in batch
            ))
            for (peer, group), answer in zip(batch, answers, strict=True):
                if answer is None:
                    continue
                for search, result in zip(group, answer.results, strict=False):
                    nearest = zip(result.nearest_node_ids, result.nearest_peer_ids, strict=False)
                    for node_id, peer_bytes in nearest:
                        if len(node_id) != 20:
                            continue
                        try:
                            other = peer_id_text(peer_bytes)
                        except Exception:  # not base58-encodable: ignore the neighbour
                            continue
                        search.known.setdefault(int.from_bytes(node_id, "big"), other)
                        named_by.setdefault(other, peer)
                    if len(answer.peer.node_id) == 20:
                        search.known[int.from_bytes(answer.peer.node_id, "big")] = peer
                    if result.type == protos.FOUND_DICTIONARY:
                        dictionary = checked_dictionary(search.key_id, result.value)
                        if dictionary is not None:
                            search.add(dictionary)
                    elif result.type == protos.FOUND_REGULAR:
                        logger.debug("ignoring a regular value under %r", search.key)
            pending = {}
            for search in searches.values():
                if search.done or (search.found and not latest):
                    search.done = True
                    continue
                nodes = search.next_nodes()
                if not nodes:
                    search.done = True
                for node in nodes:
                    group = pending.setdefault(node, [])
                    if len(group) < MAX_KEYS_PER_CALL:
                        group.append(search)
        return {key: unpack_entries(s.key_id, s.merged) for key, s in searches.items() if s.merged}

    async def _ask(self, peer: str, group: list[_Search], via: str | None, timeout_s: float):
        request = protos.FindRequest(keys=[s.key_id for s in group], peer=protos.NodeInfo()).SerializeToString()
        addrs = self.initial.get(peer) or self.addrs_of(peer)
        try:
            if not addrs and via is not None:
                addrs = await self.find_addrs(via, peer, timeout_s)
            data = await self.call(peer, addrs, FIND_RPC, request, timeout_s)
            answer = protos.FindResponse.FromString(data)
        except (SwarmError, ConnectionError, TimeoutError) as e:
            logger.debug("rpc_find at %s failed: %s", peer[-6:], e)
            return None
        except Exception as e:  # an unparsable answer
            logger.debug("rpc_find at %s: bad answer (%r)", peer[-6:], e)
            return None
        if len(answer.results) != len(group):
            logger.debug("rpc_find at %s: %d results for %d keys", peer[-6:], len(answer.results), len(group))
            return None
        return answer
