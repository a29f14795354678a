"""The owner signatures of DHT records, checked without hivemind (for the lite transport's reads).

hivemind's RSASignatureValidator (hivemind/dht/crypto.py) protects every key or subkey that carries an
`[owner:<key>]` marker, where <key> is the owner's RSA public key in OpenSSH form ("ssh-rsa AAAA..."):
a stored value must then end in exactly one `[signature:<sig>]` marker, <sig> being base64 of an RSA-PSS
signature (MGF1-SHA256, maximal salt, SHA-256) over the record with the marker removed, serialized as
hivemind's MSGPackSerializer serializes the tuple (key, subkey, value, expiration_time):

    msgpack(ExtType(0x40, msgpack([key, subkey, value, expiration_time])))   # strict types, bin type

with key = the 20-byte DHT id, subkey = the msgpack of the subkey, value = the stripped value bytes and
expiration_time = the float the record expires at. `verify_and_strip` applies exactly hivemind's rules
(no marker: not protected; two different owner keys: invalid; not exactly one signature: invalid) and
returns the stripped value, or None where hivemind's validator says False. tests/test_signatures.py
checks it against hivemind's own validator, both ways.
"""

from __future__ import annotations

import base64
import binascii
import re

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")
_SIGNATURE_RE = re.compile(rb"\[signature:(.+?)\]")
_TUPLE_EXT = 0x40  # hivemind's MSGPackSerializer code for a tuple
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def signed_bytes(key: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """What the owner signs: hivemind's serialization of the record tuple."""
    inner = msgpack.packb([key, subkey, value, expiration_time], use_bin_type=True, strict_types=True)
    return msgpack.packb(msgpack.ExtType(_TUPLE_EXT, inner), use_bin_type=True, strict_types=True)


def verify_and_strip(key: bytes, subkey: bytes | None, value: bytes, expiration_time: float) -> bytes | None:
    """The value without its signature if the record passes hivemind's signature rules, else None."""
    owners = _OWNER_RE.findall(key) + (_OWNER_RE.findall(subkey) if subkey is not None else [])
    if not owners:
        return value  # not protected: hivemind stores and returns it as it is
    if len(set(owners)) > 1:
        return None
    try:
        public_key = serialization.load_ssh_public_key(owners[0])
    except (ValueError, UnsupportedAlgorithm):
        return None  # hivemind's validator raises here, and the node drops the whole answer
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    signatures = _SIGNATURE_RE.findall(value)
    if len(signatures) != 1:
        return None
    stripped = _SIGNATURE_RE.sub(b"", value)
    signed = signed_bytes(key, subkey, stripped, expiration_time)
    try:
        public_key.verify(base64.b64decode(signatures[0]), signed, _PSS, hashes.SHA256())
    except (ValueError, binascii.Error, InvalidSignature):
        return None
    return stripped
