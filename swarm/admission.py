"""Private swarms: only holders of the swarm key (swarm.swarmkey) get through any door of a member.

Why not libp2p's private networks (pnet, a pre-shared key on every connection)? The p2pd that
hivemind 1.1.12 ships links go-libp2p's pnet package but takes no key: `p2pd -h` lists no such flag,
its JSON config has no such field, and LIBP2P_FORCE_PNET=1 only makes it refuse to start ("private
network was not configured"). Building our own p2pd would take a Go toolchain and a fork. pnet would
also fail an outsider's handshake with a bare connection reset, where we owe a clear error, and it
would not cover a peer's direct TLS port (swarm.direct), which bypasses libp2p. So admission sits one
layer up, on every door, with the tools hivemind gives:

* DHT (join, store, get): hivemind's authorizer hook (`DHTNode.create(authorizer=...)`, checked on
  every DHT RPC both ways by `AuthRPCWrapper`). `SwarmAuthorizer` is a `TokenAuthorizerBase` whose
  access token is self-issued: an HMAC, under the key's "dht token" sub-key, of the node's RSA
  public key and an expiry. hivemind then signs every request and response with that RSA key, with a
  nonce and a time (replays and clocks more than a minute apart are refused). A request without a
  valid token is refused with an error that says why (no key, another key); a response without one
  is dropped, so an outsider can neither read records, store them, nor enter routing tables.
* Streams over p2pd (inference, forward, info, and every other stream handler): `SwarmP2P` sends,
  as the first message of every stream it opens, {"type": "admit", "key_id", "proof"} with proof =
  HMAC("stream admission" sub-key, dialer peer id, listener peer id, handler). libp2p authenticates
  both peer ids, so a proof is worthless to anyone but the dialer it names, at that listener and
  handler; no nonce is needed. Every handler a SwarmP2P serves checks it first and answers anything
  else with {"type": "error", "code": "private", "fatal": true, "message": ...} before closing.
* Direct TLS streams: the same proof travels in the direct handshake's hello (swarm.direct), and a
  bad one is refused before the welcome, with the same code and message.
* Joining: before its DHT node starts, a node asks each initial peer ADMISSION_HANDLER whether the
  swarm is private (and, through the gate, whether our key is its key), so a wrong or missing key,
  or a key given for a public swarm, stops the start with a clear NotAdmitted / ConfigError instead
  of an empty DHT.

What an outsider still sees: that a libp2p host listens at an address, its peer id and the
protocols it names (libp2p's identify), as with any open TCP port; nothing the swarm stores or serves.
The health page publishes what its owner chooses (bootstrap.health.publish).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

# the hivemind-free half (proofs, refusals), re-exported: swarm.direct and swarm.lite use it without hivemind
from swarm.admit import (  # noqa: F401
    ADMISSION_HANDLER,
    ERROR_PRIVATE,
    admit_fields,
    check_admit,
    proof,
    raise_refusal,
    refusal,
)
from swarm.errors import ConfigError, NotAdmitted, PeerError, ProtocolError
from swarm.protocol import error_message, read_message, write_message
from swarm.swarmkey import SwarmKey

logger = logging.getLogger(__name__)

ADMIT_BYTES = 4096  # an admit message is ~100 bytes
ADMIT_TIMEOUT_S = 10.0  # a dialer says who it is at once, or is dropped
REFUSAL_LINGER_S = 2.0  # after refusing, read (and drop) what the dialer still sends, so the error arrives
TOKEN_TTL_S = 3600.0  # a DHT access token's life; renewed 5 minutes before it ends
_TOKEN_RENEW_S = 300.0
CHECK_TIMEOUT_S = 10.0


class SwarmP2P(P2P):
    """hivemind's P2P, gated: with a `swarm_key`, every stream it opens starts with an admit message and
    every stream handler it serves checks one first (see the module docstring). Without a key (the
    instances hivemind itself makes, e.g. for its identity check) it is a plain P2P."""

    swarm_key: SwarmKey | None = None

    async def call_binary_stream_handler(self, peer_id: PeerID, handler_name: str):
        info, reader, writer = await super().call_binary_stream_handler(peer_id, handler_name)
        if self.swarm_key is not None:
            try:
                await write_message(writer, {"type": "admit", **admit_fields(
                    self.swarm_key, self.peer_id.to_base58(), peer_id.to_base58(), handler_name)})
            except BaseException:
                writer.close()
                raise
        return info, reader, writer

    async def add_binary_stream_handler(self, name: str, handler, balanced: bool = False) -> None:
        if self.swarm_key is not None:
            handler = self._gated(name, handler)
        await super().add_binary_stream_handler(name, handler, balanced)

    def _gated(self, name: str, handler):
        key = self.swarm_key

        async def gate(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dialer = stream_info.peer_id.to_base58()
            try:
                try:
                    async with asyncio.timeout(ADMIT_TIMEOUT_S):
                        message = await read_message(reader, ADMIT_BYTES)
                except ProtocolError:  # not even a small msgpack map first: not one of ours
                    message = {}
                check_admit(key, message if message.get("type") == "admit" else {}, dialer,
                            self.peer_id.to_base58(), name)
            except NotAdmitted as e:
                logger.info("refused %s from %s: %s", name, dialer, e)
                with contextlib.suppress(Exception):
                    await write_message(writer, error_message(ERROR_PRIVATE, str(e), fatal=True))
                    await asyncio.wait_for(_discard(reader), REFUSAL_LINGER_S)
                writer.close()
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                logger.debug("%s from %s closed before admission: %r", name, dialer, e)
                writer.close()
                return
            await handler(stream_info, reader, writer)

        return gate


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


# ---------------------------------------------------------------- "is this swarm private?"


async def serve_admission(p2p: P2P) -> None:
    """Answer ADMISSION_HANDLER: {"type": "admission", "private": bool}. Behind a SwarmP2P's gate, a dialer
    without our key never gets this far: it reads the gate's refusal instead."""
    private = getattr(p2p, "swarm_key", None) is not None

    async def handle(stream_info, reader, writer) -> None:
        try:
            # a public node reads a private dialer's admit message here: the answer tells it all the same
            await asyncio.wait_for(read_message(reader, ADMIT_BYTES), ADMIT_TIMEOUT_S)
            await write_message(writer, {"type": "admission", "private": private})
        except (ProtocolError, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            logger.debug("admission request from %s failed: %r", stream_info.peer_id, e)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(ADMISSION_HANDLER, handle)


def peer_id_of_maddr(addr: str) -> str | None:
    """The peer id a multiaddr ends with (/p2p/<id>), if any."""
    _, found, rest = addr.rpartition("/p2p/")
    return rest.split("/")[0] if found and rest else None


async def check_swarm(p2p: P2P, initial_peers: Sequence[str], timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Before joining: ask the initial peers whether the swarm is private and whether we may enter.

    Returns once one initial peer admits us (or none can tell: unreachable, older software without the
    handler, on a public swarm); raises NotAdmitted when they refuse our key (or our lack of one), and
    ConfigError when we hold a key and the swarm is public or its nodes know no private swarms."""
    ours = getattr(p2p, "swarm_key", None)
    peers = {pid: addr for addr in initial_peers if (pid := peer_id_of_maddr(addr))}
    if not peers:
        return
    results = await asyncio.gather(*(_ask(p2p, pid, addr, timeout_s) for pid, addr in peers.items()),
                                   return_exceptions=True)
    answers = [r for r in results if isinstance(r, dict)]
    if ours is None and any(a.get("private") is False for a in answers):
        return
    if ours is not None and any(a.get("private") is True for a in answers):
        return
    refused = [r for r in results if isinstance(r, NotAdmitted)]
    if refused:
        raise refused[0]
    if ours is not None and answers:
        raise ConfigError(f"you passed --swarm-key (key id {ours.key_id}), but the swarm at {list(peers.values())[0]} "
                          "is public (its nodes hold no swarm key); leave --swarm-key out, or join the private "
                          "swarm's own bootstrap")
    unsupported = [r for r in results if isinstance(r, _Unsupported)]
    if ours is not None and unsupported and len(unsupported) == len(results):
        raise ConfigError(f"you passed --swarm-key, but {list(peers.values())[0]} runs software that knows no "
                          "private swarms; upgrade it, or leave --swarm-key out")
    # unreachable or silent: the DHT join that follows says so in its own words


class _Unsupported(Exception):
    pass


async def _ask(p2p: P2P, peer_id: str, addr: str, timeout_s: float) -> dict:
    pid = PeerID.from_base58(peer_id)
    try:
        async with asyncio.timeout(timeout_s):
            # p2pd wants the transport address: a trailing /p2p/<id> breaks its decoder (as in swarm.net.connect)
            await p2p._client.connect(pid, [Multiaddr(addr.split("/p2p/")[0])])
            _, reader, writer = await p2p.call_binary_stream_handler(pid, ADMISSION_HANDLER)
            try:
                await write_message(writer, {"type": "admission"})
                reply = await read_message(reader, ADMIT_BYTES)
            finally:
                writer.close()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
        raise PeerError(f"no admission answer: {e!r}", peer=peer_id) from e
    except Exception as e:  # p2pd: dial failures and unknown protocols come as generic errors with text
        if "protocol" in str(e).lower() and "not supported" in str(e).lower():
            raise _Unsupported(peer_id) from e
        raise PeerError(f"could not ask for admission: {e!r:.200}", peer=peer_id) from e
    raise_refusal(reply, f"joining through {addr}")
    if reply.get("type") != "admission" or type(reply.get("private")) is not bool:
        raise PeerError(f"bad admission answer {str(reply)[:100]}", peer=peer_id)
    return reply


# ---------------------------------------------------------------- the DHT's door


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's token authorizer with self-issued tokens: holding the swarm key is the permission.

    A token is {username: "swarm-key:<key id>", public_key: the node's RSA key, expiration_time: unix
    time as text, signature: HMAC("dht token" sub-key, those three)}. A refused request raises
    NotAdmitted, which hivemind sends back as the RPC's error text (where the base class would return
    None, and the caller would read a bare AttributeError)."""

    def __init__(self, key: SwarmKey, local_private_key: RSAPrivateKey | None = None):
        super().__init__(local_private_key or RSAPrivateKey())  # a key of its own: it only signs DHT RPCs
        self._key = key
        self._mac_key = key.derive("dht token")

    def _mac(self, token: AccessToken) -> bytes:
        text = token.username.encode() + b"\x00" + token.public_key + b"\x00" + token.expiration_time.encode()
        return hmac.new(self._mac_key, text, hashlib.sha256).digest()

    async def get_token(self) -> AccessToken:
        token = AccessToken(username=f"swarm-key:{self._key.key_id}", public_key=self.local_public_key.to_bytes(),
                            expiration_time=f"{time.time() + TOKEN_TTL_S:.3f}")
        token.signature = self._mac(token)
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return hmac.compare_digest(access_token.signature, self._mac(access_token)) and _expiry(access_token) > time.time()

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return _expiry(access_token) < time.time() + _TOKEN_RENEW_S

    async def validate_request(self, request) -> bool:
        token = request.auth.client_access_token
        if not self.is_token_valid(token):
            if not token.signature:
                raise NotAdmitted(refusal("this DHT node", None))
            their_id = token.username.removeprefix("swarm-key:")
            if their_id == self._key.key_id and hmac.compare_digest(token.signature, self._mac(token)):
                raise NotAdmitted("this swarm is private: your DHT access token expired (clocks more than an hour "
                                  "apart?); check this machine's clock")
            raise NotAdmitted(refusal("this DHT node", their_id or "?"))
        if not await super().validate_request(request):
            raise NotAdmitted("this swarm is private: a DHT request failed authentication (a replay, or clocks "
                              "more than a minute apart); check this machine's clock")
        return True


def _expiry(token: AccessToken) -> float:
    try:
        return float(token.expiration_time)
    except ValueError:
        return 0.0
