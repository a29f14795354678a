"""A peer's identity: one RSA key that is both its libp2p identity and its DHT record-signing key.

One file, one key. The file is exactly what the go-libp2p daemon (p2pd) reads with `-id` and what
`hivemind.P2P.generate_identity` writes: a serialized libp2p `crypto.pb.PrivateKey` protobuf with
`key_type = RSA` and `data` = the PKCS#1 DER private key (2048 bits). p2pd derives the peer id from
it (sha2-256 multihash of the protobuf-wrapped public key, so a restart with the same file is the same
peer), and the same key signs the peer's DHT records through hivemind's `RSASignatureValidator`.
Because the peer id is a hash of the signing key, anyone can check that a record's owner marker
(`[owner:ssh-rsa ...]`) belongs to the peer id it claims (`peer_id_of_ssh_key`).

Contract:
  * `Identity.load_or_create(path)` reads `path`, or creates it (mode 0600, written atomically: a
    half-written file never appears, and two processes racing on a fresh path end with one key).
  * A file that is unreadable, not that protobuf, not RSA, or shorter than 2048 bits raises
    `ConfigError` naming the file; the file is never overwritten.
  * `path=None` gives an ephemeral identity: a fresh key written to a private temporary file (p2pd
    takes a key only from a file). `close()` removes that file; p2pd reads it only when it starts, so
    closing right after `P2P.create` is fine. Closing a persistent identity does nothing.
  * Never `RSAPrivateKey.process_wide()`: that is a fresh key per process, so a restarted peer would
    lose the ownership of its own records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import ConfigError
from swarm.peerid import peer_id_of_public_key, peer_id_of_ssh_key  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

RSA_KEY_BITS = 2048
_MAX_IDENTITY_FILE_BYTES = 64 * 1024  # a 4096-bit RSA key is ~2.4 KiB; anything huge is not a key file


@dataclass(frozen=True, eq=False)
class Identity:
    """One RSA key: the libp2p identity (`p2pd_identity_path`) and the record signer (`rsa_key`)."""

    rsa_key: RSAPrivateKey
    peer_id: PeerID  # what p2pd reports as its peer id when started with p2pd_identity_path
    p2pd_identity_path: str  # pass to hivemind.P2P.create(identity_path=...)
    is_ephemeral: bool = False

    @classmethod
    def load_or_create(cls, path: str | None) -> Identity:
        """Load the identity in `path`, creating it first if it does not exist; None = ephemeral."""
        if path is None:
            return cls._ephemeral()
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.lexists(path):
            _create_identity_file(path)
        return cls._load(path)

    @classmethod
    def _load(cls, path: str) -> Identity:
        data = _read_identity_file(path)
        return cls(
            rsa_key=_parse_identity(data, path), peer_id=PeerID.from_identity(data), p2pd_identity_path=path
        )

    @classmethod
    def _ephemeral(cls) -> Identity:
        fd, path = tempfile.mkstemp(prefix="swarm-identity-", suffix=".key")  # mode 0600 by construction
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_serialize_identity(_generate_rsa_key()))
            loaded = cls._load(path)
        except BaseException:
            os.unlink(path)
            raise
        return replace(loaded, is_ephemeral=True)

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The key as a `cryptography` object (TLS certificates and signatures of swarm.direct)."""
        return self.rsa_key._private_key

    @property
    def owner_marker(self) -> str:
        """The `[owner:ssh-rsa ...]` marker hivemind's RSASignatureValidator looks for in keys/subkeys."""
        return owner_marker(self.rsa_key)

    def close(self) -> None:
        """Remove the temporary key file of an ephemeral identity (idempotent); no-op otherwise."""
        if self.is_ephemeral:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.p2pd_identity_path)

    def __enter__(self) -> Identity:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def owner_marker(rsa_key: RSAPrivateKey) -> str:
    """`[owner:<OpenSSH public key>]`, byte for byte what `RSASignatureValidator.local_public_key` holds."""
    return "[owner:" + rsa_key.get_public_key().to_bytes().decode("ascii") + "]"


def _generate_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)


def _serialize_identity(key: rsa.RSAPrivateKey) -> bytes:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()


def _create_identity_file(path: str) -> None:
    """Write a fresh key to `path` atomically: a private temp file in the same folder, then link()."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ConfigError(
            f"identity file {path}: folder {folder} does not exist; create it or pick another path"
        )
    tmp_path = None
    try:
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".swarm-identity-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(_serialize_identity(_generate_rsa_key()))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp_path, path)  # unlike rename, fails if another process created it meanwhile: keep theirs
        logger.info("created a new identity in %s", path)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"identity file {path} cannot be created ({e.strerror}); check the folder") from e
    finally:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)


def _read_identity_file(path: str) -> bytes:
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"identity file {path} is not a regular file; pass the path of a key file")
        if mode & 0o077:
            logger.warning("identity file %s is readable by other users; run: chmod 600 %s", path, path)
        with open(path, "rb") as f:
            data = f.read(_MAX_IDENTITY_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"identity file {path} cannot be read ({e.strerror}); check its permissions") from e
    if len(data) > _MAX_IDENTITY_FILE_BYTES:
        raise ConfigError(f"identity file {path} is too large to be a key file; pass another --identity path")
    return data


def _parse_identity(data: bytes, path: str) -> RSAPrivateKey:
    corrupt = (
        f"identity file {path} is not a valid libp2p RSA identity; restore it from a backup, or move it away "
        "to create a new identity (a new peer id)"
    )
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
    except DecodeError as e:
        raise ConfigError(corrupt) from e
    if message.key_type != crypto_pb2.KeyType.RSA:
        key_type = (
            crypto_pb2.KeyType.Name(message.key_type)
            if message.key_type in crypto_pb2.KeyType.values()
            else "?"
        )
        raise ConfigError(
            f"identity file {path} holds a {key_type} key; swarm needs an RSA key because the same key signs "
            "the peer's DHT records (move the file away to create a new identity)"
        )
    try:
        key = serialization.load_der_private_key(message.data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(corrupt) from e
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < RSA_KEY_BITS:
        raise ConfigError(corrupt + f" (need an RSA key of at least {RSA_KEY_BITS} bits)")
    wrapped = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's only loader is its pickle path
    wrapped.__setstate__({"_private_key": message.data})
    return wrapped
