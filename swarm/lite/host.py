"""The trio side of the lite transport: a py-libp2p host, dials, streams and the two RPCs it needs.

Everything here runs on the TrioThread (swarm.lite.bridge) and is called through `TrioThread.call`.

Interoperation with hivemind's p2pd (go-libp2p): p2pd offers /tls/1.0.0 and /noise for security (both on
by default, `-tls` and `-noise`) and /yamux/1.0.0 as muxer (`-muxer`, default yamux). py-libp2p 0.8.1
speaks /noise (XX) and /yamux/1.0.0, so the host is built with exactly those two: no option on the
daemon side is needed. The identity is an RSA key (as a hivemind peer's), so the peer id the swarm's
peers see is the same one the direct-stream handshake (swarm.direct) proves.

Two RPCs besides plain streams:
  * hivemind's unary protobuf calls, as p2pd carries them between daemons: the caller opens a stream
    whose protocol id is the handler name ("DHTProtocol.rpc_find"), writes one varint-length-prefixed
    PersistentConnectionRequest{callId: 16 random bytes, callUnary{peer, proto, data: the request}}
    and reads one PersistentConnectionRequest whose unaryResponse holds the reply (or an error text).
  * libp2p Kademlia's FIND_NODE (/ipfs/kad/1.0.0, which every p2pd serves in its dhtServer mode), to
    learn the addresses of a hivemind DHT node that another node named by peer id only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

import multiaddr
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from swarm import protos
from swarm.errors import PeerError, PeerRefused, ProtocolError

logger = logging.getLogger(__name__)

KAD_PROTOCOL = "/ipfs/kad/1.0.0"
MAX_UNARY_BYTES = 4 << 20  # p2pd's -persistentConnMaxMsgSize default: nothing larger comes from a daemon
MAX_KAD_BYTES = 1 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _read_exactly(stream, n: int) -> bytes:
    from libp2p.network.stream.exceptions import StreamEOF

    chunks, left = [], n
    while left:
        try:
            chunk = await stream.read(left)
        except StreamEOF:
            chunk = b""
        if not chunk:
            raise PeerError(f"stream closed {n - left} bytes into a {n}-byte message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def _read_delimited(stream, max_bytes: int) -> bytes:
    length, shift = 0, 0
    while True:
        byte = (await _read_exactly(stream, 1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 35:
            raise ProtocolError("message length prefix is not a varint")
    if length > max_bytes:
        raise ProtocolError(f"message of {length} bytes, at most {max_bytes} allowed")
    return await _read_exactly(stream, length)


def dial_addrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """The addresses py-libp2p can dial, without their /p2p/<id> part: plain TCP ones (relayed
    /p2p-circuit addresses and other transports are left out)."""
    out = []
    for addr in addrs:
        if "/p2p-circuit" in addr or "/tcp/" not in addr or "/ws" in addr:
            continue
        try:
            out.append(multiaddr.Multiaddr(addr.split("/p2p/")[0]))
        except Exception:  # not parseable here: one bad address must not hide the others
            continue
    return out


class LiteHost:
    """A py-libp2p host (client only: it listens nowhere) and the calls the lite transport makes."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        from Crypto.PublicKey import RSA
        from libp2p import new_host
        from libp2p.crypto.keys import KeyPair
        from libp2p.crypto.rsa import RSAPrivateKey
        from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
        from libp2p.custom_types import TProtocol
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
        from libp2p.security.noise.transport import Transport as NoiseTransport
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX
        from libp2p.stream_muxer.yamux.yamux import Yamux

        der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        key = RSAPrivateKey(RSA.import_key(der))
        key_pair = KeyPair(key, key.get_public_key())
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE): NoiseTransport(key_pair, noise_privkey=x25519_pair().private_key)},
            muxer_opt={TProtocol(YAMUX): Yamux},
        )
        self.peer_id = self.host.get_id().to_base58()
        self._started = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the host until cancelled (a task in the TrioThread's nursery)."""
        async with self.host.run(listen_addrs=[]):
            task_status.started()
            await trio.sleep_forever()

    def _id(self, peer_id: str):
        from libp2p.peer.id import ID

        return ID.from_base58(peer_id)

    async def connect(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> None:
        """Connect to `peer_id` at `addrs` (or wherever the peerstore knows it); PeerError if it fails."""
        from libp2p.peer.peerinfo import PeerInfo

        pid = self._id(peer_id)
        with trio.move_on_after(timeout_s) as scope:
            try:
                await self.host.connect(PeerInfo(pid, dial_addrs(addrs)))
            except Exception as e:  # py-libp2p raises its own error types, each with its text
                raise PeerError(f"could not connect: {type(e).__name__}: {e}"[:300], peer=peer_id) from None
        if scope.cancelled_caught:
            raise PeerError(f"could not connect within {timeout_s:g} s", peer=peer_id)

    def connected(self, peer_id: str) -> bool:
        return bool(self.host.get_network().connections.get(self._id(peer_id)))

    def known_addrs(self, peer_id: str) -> list[str]:
        try:
            return [str(a) for a in self.host.get_peerstore().addrs(self._id(peer_id))]
        except Exception:  # unknown peer
            return []

    async def new_stream(self, peer_id: str, addrs: Sequence[str], protocol: str, timeout_s: float):
        """A stream to `protocol` of `peer_id`, connecting first if needed. PeerError if the peer cannot be
        reached; LookupError (with py-libp2p's text) if it does not speak `protocol`."""
        from libp2p.custom_types import TProtocol

        with trio.move_on_after(timeout_s) as scope:
            if addrs or not self.connected(peer_id):
                await self.connect(peer_id, addrs, timeout_s)
            try:
                return await self.host.new_stream(self._id(peer_id), [TProtocol(protocol)])
            except Exception as e:  # negotiation failures come as generic errors with text
                text = f"{type(e).__name__}: {e}"
                if "protocol" in text.lower() and ("not supported" in text.lower() or "negotiat" in text.lower()):
                    raise LookupError(text[:300]) from None
                raise PeerError(f"could not open {protocol}: {text}"[:300], peer=peer_id) from None
        assert scope.cancelled_caught
        raise PeerError(f"could not open {protocol} within {timeout_s:g} s", peer=peer_id)

    async def call_unary(self, peer_id: str, addrs: Sequence[str], proto: str, data: bytes, timeout_s: float) -> bytes:
        """One hivemind unary protobuf call (module docstring): the reply's bytes. PeerRefused when the
        remote handler failed, PeerError when the peer is unreachable or answers nothing in time."""
        with trio.move_on_after(timeout_s) as scope:
            stream = await self.new_stream(peer_id, addrs, proto, timeout_s)
            try:
                request = protos.PersistentConnectionRequest(
                    callId=secrets.token_bytes(16),
                    callUnary=protos.CallUnaryRequest(peer=self._id(peer_id).to_bytes(), proto=proto, data=data),
                ).SerializeToString()
                await stream.write(_varint(len(request)) + request)
                answer = protos.PersistentConnectionRequest.FromString(await _read_delimited(stream, MAX_UNARY_BYTES))
            except (PeerError, ProtocolError):
                raise
            except Exception as e:  # a reset stream or an unparsable answer: the peer's failure
                raise PeerError(f"{proto} failed: {type(e).__name__}: {e}"[:300], peer=peer_id) from None
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.reset()
                    except Exception:  # already closed
                        pass
            if answer.WhichOneof("message") != "unaryResponse":
                raise PeerError(f"{proto}: the answer is not a unary response", peer=peer_id)
            if answer.unaryResponse.WhichOneof("result") == "error":
                raise PeerRefused(f"{proto}: {answer.unaryResponse.error.decode(errors='replace')[:200]}", peer=peer_id)
            return answer.unaryResponse.response
        assert scope.cancelled_caught
        raise PeerError(f"no answer to {proto} within {timeout_s:g} s", peer=peer_id)

    async def find_node_addrs(self, via: str, target: str, timeout_s: float) -> list[str]:
        """Ask `via` (a p2pd we are connected to) for the addresses of `target` over libp2p Kademlia's
        FIND_NODE; [] when it knows none or does not answer."""
        from libp2p.kad_dht.pb.kademlia_pb2 import Message

        with trio.move_on_after(timeout_s):
            try:
                stream = await self.new_stream(via, (), KAD_PROTOCOL, timeout_s)
            except (PeerError, LookupError):
                return []
            try:
                request = Message(type=Message.MessageType.FIND_NODE, key=self._id(target).to_bytes())
                payload = request.SerializeToString()
                await stream.write(_varint(len(payload)) + payload)
                answer = Message.FromString(await _read_delimited(stream, MAX_KAD_BYTES))
            except Exception as e:  # best effort: the caller goes on without this peer
                logger.debug("FIND_NODE %s via %s failed: %r", target[-6:], via[-6:], e)
                return []
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.reset()
                    except Exception:  # already closed
                        pass
            target_bytes = self._id(target).to_bytes()
            for peer in answer.closerPeers:
                if peer.id == target_bytes:
                    found = []
                    for raw in peer.addrs:
                        try:
                            found.append(str(multiaddr.Multiaddr(raw)))
                        except Exception:  # skip what py-multiaddr cannot read
                            continue
                    return found
        return []
