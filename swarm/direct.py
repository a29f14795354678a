"""Direct streams between swarm nodes over TLS, beside p2pd: the short data path for steps.

Through p2pd a message crosses two daemons and four sockets (ours -> our p2pd -> their p2pd -> theirs);
on loopback that is ~0.35 ms each way, against ~0.03 ms for one TLS socket (benchmarks/README.md). A
peer therefore also listens on a plain TCP port (`--direct-port`), announces it in its DHT records
("direct"), and clients and pushing peers that can reach it use it; anyone who cannot keeps p2pd.

Authentication, both ways, with the same RSA identity keys as libp2p (swarm.identity):
  * TLS 1.3 (the stdlib's OpenSSL). The listener's certificate is self-signed with its identity key;
    the dialer checks that the certificate's key hashes to the peer id it meant to reach (the handshake
    proves the listener holds that key). Encryption and integrity are TLS's.
  * The listener then sends {"type": "challenge", "nonce": 32 random bytes}; the dialer answers
    {"type": "hello", "handler", "key": its DER public key, "signature"} over DIRECT_CONTEXT, the
    listener's peer id, the handler and the nonce (PKCS#1 v1.5, SHA-256). The listener checks the
    signature, derives the dialer's peer id from the key and replies {"type": "welcome"}, or an error
    and closes. A hello is useless elsewhere: it names this listener and this nonce.
  * In a private swarm (swarm.admission) the hello also carries "admission": {"key_id", "proof"}, the
    dialer's proof that it holds the swarm key, made for its own peer id, this listener and the handler;
    without a good one the listener answers an error of code "private" instead of the welcome.
  * After the welcome the stream is the handler's, framed like every swarm stream (swarm.protocol),
    and the handler sees the dialer's peer id exactly as p2pd would report it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import secrets
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

# no hivemind at module level: the dialer runs in the lite client too (swarm.lite); the listener's few
# hivemind names are imported where it uses them
from swarm.admit import ERROR_PRIVATE, admit_fields, check_admit
from swarm.errors import NotAdmitted, PeerError, PeerRefused, ProtocolError
from swarm.peerid import peer_id_of_public_key
from swarm.protocol import ERROR_PROTOCOL, ERROR_REFUSED, error_message, read_message, require, write_message
from swarm.swarmkey import SwarmKey

if TYPE_CHECKING:
    from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)

DIRECT_CONTEXT = b"swarm direct stream v1\x00"
MAX_KEY_BITS = 8192  # a huge key would make each signature check slow
HELLO_BYTES = 16 * 1024  # a hello holds a 2048..8192-bit public key and a signature
HANDSHAKE_TIMEOUT_S = 10.0  # TLS, challenge and hello together
MAX_CONNECTIONS = 1024  # open direct connections per listener (from accept, before TLS); more are closed
MAX_PER_HOST = 256  # of those, from one remote address
MAX_DIAL_ADDRS = 3  # a dialer tries at most this many of a peer's direct addresses
RETRY_AFTER_S = 300.0  # a (peer, address) that failed is not dialed again for this long

Handler = Callable[["StreamInfo", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class StreamInfo:
    """What a handler learns about a direct stream: the authenticated peer id of the dialer."""

    peer_id: PeerID


def _server_context(key: rsa.RSAPrivateKey, peer_id: str) -> ssl.SSLContext:
    """TLS 1.3 with a self-signed certificate of the identity key (the stdlib loads keys only from files)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="swarm-direct-") as folder:  # mode 0700
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        context.load_cert_chain(cert_path, key_path)
    return context


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # no names or CAs here: the dialer checks the key against the peer id
    context.verify_mode = ssl.CERT_NONE
    return context


def _signed_text(listener: str, handler: str, nonce: bytes) -> bytes:
    return DIRECT_CONTEXT + listener.encode() + b"\x00" + handler.encode() + b"\x00" + nonce


class _Reader(asyncio.StreamReader):
    """A stream reader whose TLS failures read like any broken connection: handlers and clients catch
    ConnectionError, and a peer that sends a corrupt TLS record must not get past that."""

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, ssl.SSLError):
            exc = ConnectionResetError(f"TLS: {exc}")
        super().set_exception(exc)


class _Protocol(asyncio.StreamReaderProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, client_connected_cb=None):
        self.reader = _Reader(limit=2**16, loop=loop)  # the base class holds only a weak reference
        super().__init__(self.reader, client_connected_cb, loop=loop)


class DirectServer:
    """Listens for direct streams and hands each, once authenticated, to the handler it names.

    Connections count from accept (before TLS), at most MAX_CONNECTIONS in all and MAX_PER_HOST from one
    address; over that, a connection is closed at once (the dialer goes through p2pd)."""

    def __init__(self, key: rsa.RSAPrivateKey, peer_id: str, handlers: dict[str, Handler],
                 swarm_key: SwarmKey | None = None):
        self.peer_id = peer_id
        self.handlers = handlers
        self.swarm_key = swarm_key  # a private swarm's: dialers must prove they hold it (swarm.admission)
        self.accepted = 0  # streams handed to a handler
        self.refused = 0  # connections over the limits, that failed the handshake or named no handler here
        self._context = _server_context(key, peer_id)
        self._server: asyncio.Server | None = None
        self._per_host: dict[str, int] = {}
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(loop, self._serve), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every open direct stream (their handlers see the connection end)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = str((writer.get_extra_info("peername") or ("?",))[0])
        if len(self._writers) >= MAX_CONNECTIONS or self._per_host.get(host, 0) >= MAX_PER_HOST:
            self.refused += 1
            writer.transport.abort()
            return
        self._writers.add(writer)
        self._per_host[host] = self._per_host.get(host, 0) + 1
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    await writer.start_tls(self._context)
                    handler, dialer = await self._handshake(reader, writer)
            except (ProtocolError, PeerRefused) as e:
                self.refused += 1
                code = (ERROR_PRIVATE if isinstance(e, NotAdmitted) else
                        ERROR_REFUSED if isinstance(e, PeerRefused) else ERROR_PROTOCOL)
                logger.info("refused a direct stream from %s: %s", host, e)
                with contextlib.suppress(Exception):
                    await write_message(writer, error_message(code, str(e), fatal=True))
                writer.close()
                return
            except Exception as e:  # timeouts, broken TLS, closed connections, anything odd: drop it
                self.refused += 1
                logger.debug("direct handshake with %s failed: %r", host, e)
                with contextlib.suppress(Exception):  # a connection lost inside start_tls has no transport left
                    writer.close()
                return
            from hivemind.p2p import PeerID

            self.accepted += 1
            await handler(StreamInfo(PeerID.from_base58(dialer)), reader, writer)  # it closes the stream
        finally:
            self._writers.discard(writer)
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    async def _handshake(self, reader, writer) -> tuple[Handler, str]:
        from swarm.identity import RSA_KEY_BITS

        nonce = secrets.token_bytes(32)
        await write_message(writer, {"type": "challenge", "nonce": nonce})
        hello = await read_message(reader, HELLO_BYTES)
        if hello.get("type") != "hello":
            raise ProtocolError("the first message of a direct stream must be 'hello'")
        name = require(hello.get("handler"), str, "handler")
        key_der = require(hello.get("key"), bytes, "key")
        signature = require(hello.get("signature"), bytes, "signature")
        try:
            key = serialization.load_der_public_key(key_der)
        except (ValueError, UnsupportedAlgorithm):
            raise ProtocolError("field 'key': not a DER public key this peer can read") from None
        if (not isinstance(key, rsa.RSAPublicKey) or not RSA_KEY_BITS <= key.key_size <= MAX_KEY_BITS
                or key.public_numbers().e != 65537):  # a huge exponent would make each check slow
            raise ProtocolError(f"field 'key': expected an RSA key of {RSA_KEY_BITS} to {MAX_KEY_BITS} bits, e = 65537")
        try:
            key.verify(signature, _signed_text(self.peer_id, name, nonce), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ProtocolError("field 'signature' does not sign this challenge for this peer") from None
        dialer = peer_id_of_public_key(key)
        if self.swarm_key is not None:
            check_admit(self.swarm_key, hello.get("admission"), dialer, self.peer_id, name)
        handler = self.handlers.get(name)
        if handler is None:
            raise PeerRefused(f"no handler {name!r} here; this peer serves {sorted(self.handlers)}")
        await write_message(writer, {"type": "welcome"})
        return handler, dialer


class DirectDialer:
    """Opens direct streams as one identity; remembers (peer, address) pairs that failed (RETRY_AFTER_S)."""

    def __init__(self, key: rsa.RSAPrivateKey, swarm_key: SwarmKey | None = None):
        self._key = key
        self._swarm_key = swarm_key  # shown in every hello (a private swarm's members demand it)
        self._peer_id = peer_id_of_public_key(key.public_key())
        self._key_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._context = _client_context()
        self._failed: dict[tuple[str, str], float] = {}  # (peer id, address) -> when it may be tried again

    def usable(self, peer_id: str, addrs: Sequence[str]) -> list[str]:
        """The first MAX_DIAL_ADDRS of `addrs` that did not fail lately for this peer."""
        now = time.monotonic()
        return [a for a in addrs if self._failed.get((peer_id, a), 0.0) <= now][:MAX_DIAL_ADDRS]

    def _mark_failed(self, peer_id: str, addr: str) -> None:
        now = time.monotonic()
        if len(self._failed) > 4096:  # forget what expired
            self._failed = {k: t for k, t in self._failed.items() if t > now}
        self._failed[peer_id, addr] = now + RETRY_AFTER_S

    async def open_any(self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float):
        """A stream to `handler` of `peer_id` at the first of `addrs` that works, all within `timeout_s`;
        None when none does (the caller then goes through p2pd). An address that cannot be reached or
        answers as another peer is skipped for RETRY_AFTER_S (for this peer only: anyone may list any
        address in its own record); one that answers with a refusal is not."""
        try:
            async with asyncio.timeout(timeout_s):
                for addr in self.usable(peer_id, addrs):
                    try:
                        return await self.open(peer_id, addr, handler)
                    except PeerRefused as e:
                        logger.info("direct stream to %s refused (%s); using p2pd", peer_id[-6:], e)
                        return None
                    except (OSError, ValueError, asyncio.IncompleteReadError, PeerError, ProtocolError) as e:
                        logger.info("direct stream to %s at %s failed (%r)", peer_id[-6:], addr, e)
                        self._mark_failed(peer_id, addr)
        except TimeoutError:
            logger.info("no direct stream to %s within %s s; using p2pd", peer_id[-6:], timeout_s)
            for addr in self.usable(peer_id, addrs)[:1]:  # the address that was being tried
                self._mark_failed(peer_id, addr)
        return None

    async def open(self, peer_id: str, addr: str, handler: str):
        host, port = tcp_endpoint(addr)
        loop = asyncio.get_running_loop()
        protocol = _Protocol(loop)
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
        reader, writer = protocol.reader, asyncio.StreamWriter(transport, protocol, protocol.reader, loop)
        try:
            await writer.start_tls(self._context)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            found = peer_id_of_public_key(x509.load_der_x509_certificate(der).public_key())
            if found != peer_id:
                raise PeerError(f"the peer at {addr} is {found}, not the one expected", peer=peer_id)
            challenge = await read_message(reader, HELLO_BYTES)
            nonce = challenge.get("nonce") if challenge.get("type") == "challenge" else None
            if not isinstance(nonce, bytes) or len(nonce) < 16:
                raise PeerError(f"bad direct-stream challenge from {addr}", peer=peer_id)
            signature = self._key.sign(_signed_text(peer_id, handler, nonce), padding.PKCS1v15(), hashes.SHA256())
            hello = {"type": "hello", "handler": handler, "key": self._key_der, "signature": signature}
            if self._swarm_key is not None:
                hello["admission"] = admit_fields(self._swarm_key, self._peer_id, peer_id, handler)
            await write_message(writer, hello)
            reply = await read_message(reader, 64 * 1024)
            if reply.get("type") == "error" and reply.get("code") == ERROR_PRIVATE:
                raise NotAdmitted(f"direct stream to {addr} refused: {str(reply.get('message'))[:400]}", peer=peer_id)
            if reply.get("type") == "error":
                raise PeerRefused(str(reply.get("message")), peer=peer_id)
            if reply.get("type") != "welcome":
                raise PeerError(f"bad direct-stream reply from {addr}: {reply.get('type')!r}", peer=peer_id)
        except BaseException:
            writer.close()
            raise
        return reader, writer


_HOST_KINDS = ("ip4", "ip6", "dns", "dns4", "dns6")  # multiaddr protocols that name a host


def tcp_endpoint(addr: str) -> tuple[str, int]:
    """(host, port) of an /ip4|ip6|dns*/HOST/tcp/PORT multiaddr; ValueError otherwise."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in _HOST_KINDS or parts[2] != "tcp":
        raise ValueError(f"not a TCP multiaddr: {addr!r}")
    return parts[1], int(parts[3])


def direct_addrs(p2p_addrs: Sequence[str], port: int) -> list[str]:
    """Where a listener on `port` can be dialed: the hosts of its announced libp2p addresses, that port."""
    from hivemind.utils.multiaddr import Multiaddr

    found: list[str] = []
    for addr in p2p_addrs:
        if "p2p-circuit" in addr:  # a relayed address: its host is the relay's, not ours
            continue
        try:
            maddr = Multiaddr(addr.split("/p2p/")[0])
            first = maddr.protocols()[0]
            host = maddr.value_for_protocol(first.code)
        except Exception:  # not an address we can read a host from
            continue
        if first.name in _HOST_KINDS:
            candidate = f"/{first.name}/{host}/tcp/{port}"
            if candidate not in found:
                found.append(candidate)
    return found
