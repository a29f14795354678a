"""Ask a peer for its `info` over P2P, and check peer ids that arrive as text.

Any role may probe any peer: the health monitor does it every refresh, and to answer reachability
checks. The reply is untrusted: it is returned as the map `read_message` decoded (a dict, nothing
else checked but its "type"); callers read its fields with their own type checks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from hivemind.p2p import P2P, PeerID

from swarm.errors import PeerError, PeerRefused, ProtocolError
from swarm.net import connect
from swarm.protocol import INFO_HANDLER, read_message, write_message

MAX_INFO_BYTES = 64 * 1024  # an info reply is < 2 KiB
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,128}")
_SHA2_256 = b"\x12\x20"  # multihash of an RSA/secp key's hash ("Qm...")
_IDENTITY = 0x00  # identity multihash of a small (ed25519) key ("12D3KooW...")


def check_peer_id(text: object) -> PeerID:
    """A libp2p peer id from its base58 text; ProtocolError unless it is a well-formed multihash.

    `PeerID.from_base58` accepts any base58 text ("abc"), so the multihash is checked here: a sha2-256
    digest (34 bytes) or an identity hash whose length byte matches the rest.
    """
    if type(text) is not str or not _BASE58.fullmatch(text):
        raise ProtocolError(f"peer id {str(text)[:80]!r} is not 30-128 base58 characters")
    pid = PeerID.from_base58(text)
    raw = pid.to_bytes()
    sha_ok = raw[:2] == _SHA2_256 and len(raw) == 34
    identity_ok = len(raw) > 2 and raw[0] == _IDENTITY and raw[1] == len(raw) - 2
    if not (sha_ok or identity_ok):
        raise ProtocolError(f"peer id {text[:80]!r} is not a sha2-256 or identity multihash")
    return pid


async def request_info(p2p: P2P, peer_id: str, addrs: Sequence[str], timeout_s: float) -> dict:
    """Connect (at `addrs`, if any, else wherever p2pd already knows), ask `info`, return the reply.

    The whole exchange, connect included, is bounded by `timeout_s`. Raises PeerError when the peer
    cannot be reached or does not answer, PeerRefused when it answers an error, ProtocolError when the
    reply is not an info message.
    """
    pid = check_peer_id(peer_id)
    try:
        async with asyncio.timeout(timeout_s):
            if addrs:
                await connect(p2p, pid, addrs, timeout_s)
            _, reader, writer = await p2p.call_binary_stream_handler(pid, INFO_HANDLER)
            try:
                await write_message(writer, {"type": "info"})
                reply = await read_message(reader, MAX_INFO_BYTES)
            finally:
                writer.close()
    except TimeoutError:
        raise PeerError(f"no answer to info within {timeout_s:g} s", peer=peer_id) from None
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise PeerError(f"stream closed during info: {e}", peer=peer_id) from e
    except (ProtocolError, PeerError):
        raise
    except Exception as e:  # p2pd reports dial and protocol failures as generic errors with text
        raise PeerError(f"could not reach the peer: {_first_line(e)}", peer=peer_id) from e
    if reply.get("type") == "error":
        raise PeerRefused(f"info refused: {str(reply.get('message'))[:200]}", peer=peer_id)
    if reply.get("type") != "info":
        raise ProtocolError(f"peer {peer_id} answered info with a {str(reply.get('type'))[:40]!r} message")
    return reply


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
