"""libp2p peer ids without hivemind: from RSA keys, and a strict check of their base58 text.

A peer id is the multihash of the protobuf-wrapped public key (crypto.proto's PublicKey{key_type,
data}): sha2-256 for RSA keys (too long for the inline "identity" multihash), data = the DER
SubjectPublicKeyInfo. Text form: base58 (bitcoin alphabet) of the multihash bytes, as p2pd prints it.
Used on both transports: swarm.identity (hivemind) re-exports these, swarm.lite uses them directly.
"""

from __future__ import annotations

import functools
import hashlib
import re

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from swarm import protos
from swarm.errors import ProtocolError

SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32
_IDENTITY = 0x00  # identity multihash of a small (ed25519) key ("12D3KooW...")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,128}")


@functools.lru_cache(maxsize=4096)
def peer_id_of_ssh_key(ssh_public_key: str) -> str:
    """The base58 libp2p peer id of an RSA public key in OpenSSH form ('ssh-rsa AAAA...').

    Raises ValueError (or cryptography's UnsupportedAlgorithm) for anything but an RSA key."""
    return peer_id_of_public_key(serialization.load_ssh_public_key(ssh_public_key.encode("ascii")))


def peer_id_of_public_key(key) -> str:
    """The base58 libp2p peer id of an RSA public key (a `cryptography` key object); ValueError otherwise."""
    return base58.b58encode(peer_id_bytes_of_public_key(key)).decode("ascii")


def peer_id_bytes_of_public_key(key) -> bytes:
    """The multihash bytes of an RSA public key's peer id; ValueError for anything but an RSA key."""
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    wrapped = protos.PublicKey(key_type=protos.KEY_TYPE_RSA, data=der).SerializeToString()
    return SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(wrapped).digest()


def check_peer_id_text(text: object) -> bytes:
    """The multihash bytes of a base58 peer id; ProtocolError unless it is a well-formed multihash: a
    sha2-256 digest (34 bytes) or an identity hash whose length byte matches the rest."""
    if type(text) is not str or not _BASE58.fullmatch(text):
        raise ProtocolError(f"peer id {str(text)[:80]!r} is not 30-128 base58 characters")
    raw = base58.b58decode(text)
    sha_ok = raw[:2] == SHA2_256_MULTIHASH_PREFIX and len(raw) == 34
    identity_ok = len(raw) > 2 and raw[0] == _IDENTITY and raw[1] == len(raw) - 2
    if not (sha_ok or identity_ok):
        raise ProtocolError(f"peer id {text[:80]!r} is not a sha2-256 or identity multihash")
    return raw


def peer_id_text(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")
