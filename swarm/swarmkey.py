"""The swarm key of a private swarm: one shared 256-bit secret that every member holds.

File format: libp2p's private-network key file (what IPFS calls `swarm.key`), three lines:

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

`swarm make-swarm-key FILE` writes one (mode 0600, never over an existing file); so does

    printf '/key/swarm/psk/1.0.0/\\n/base16/\\n%s\\n' "$(openssl rand -hex 32)" > swarm.key

The same file would work as a libp2p pnet key if the shipped p2pd ever took one (see swarm.admission
for why admission is done above libp2p today). `/base64/` and `/bin/` encodings, which libp2p also
reads, are accepted on load.

Contract:
  * `SwarmKey.load(path)` returns the key or raises ConfigError naming the file and what is wrong
    (missing, unreadable, not this format, not 32 bytes); nothing is ever written by a load.
  * The secret never appears in a repr, a log line or an error message; `key_id` (a 12-hex-digit
    HMAC of the secret) names the key in messages, so two holders can tell whether theirs match
    without showing it.
  * `derive(purpose)` gives an independent sub-key per use (DHT tokens, stream admission), so a value
    made for one door is worthless at another.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from swarm.errors import ConfigError

KEY_BYTES = 32
HEADER = "/key/swarm/psk/1.0.0/"
_MAX_FILE_BYTES = 4096


@dataclass(frozen=True)
class SwarmKey:
    secret: bytes = field(repr=False)
    path: str | None = None

    def __post_init__(self) -> None:
        if type(self.secret) is not bytes or len(self.secret) != KEY_BYTES:
            raise ConfigError(f"a swarm key is {KEY_BYTES} bytes")

    def __repr__(self) -> str:
        return f"SwarmKey(id={self.key_id}, path={self.path!r})"

    @property
    def key_id(self) -> str:
        """A public name of the key: equal ids mean equal keys (with odds of 2**-48 otherwise)."""
        return hmac.new(self.secret, b"swarm key id v1", hashlib.sha256).hexdigest()[:12]

    def derive(self, purpose: str) -> bytes:
        """A sub-key for one purpose ("dht token", "stream admission", ...)."""
        return hmac.new(self.secret, b"swarm key v1\x00" + purpose.encode(), hashlib.sha256).digest()

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SwarmKey:
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"swarm key {path} is not a regular file; pass the path of a swarm key file")
            with open(path, "rb") as f:
                data = f.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(
                f"swarm key {path} does not exist; ask the swarm's owner for its key file, or create a new swarm "
                f"with `swarm make-swarm-key {path}`"
            ) from None
        except OSError as e:
            raise ConfigError(f"swarm key {path} cannot be read ({e.strerror}); check its permissions") from e
        if mode & 0o077:
            import logging

            logging.getLogger(__name__).warning(
                "swarm key %s is readable by other users; run: chmod 600 %s", path, path)
        if len(data) > _MAX_FILE_BYTES:
            raise ConfigError(f"swarm key {path} is too large to be a swarm key file")
        return cls(parse(data, path), path)

    def dump(self) -> bytes:
        return f"{HEADER}\n/base16/\n{self.secret.hex()}\n".encode()

    def write(self, path: str | os.PathLike) -> str:
        """Write the key to a new file `path` (mode 0600); ConfigError if it exists or cannot be made."""
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists already; a swarm key is never overwritten (move it away first)") from None
        except OSError as e:
            raise ConfigError(f"cannot create {path} ({e.strerror}); check the folder") from e
        with os.fdopen(fd, "wb") as f:
            f.write(self.dump())
            f.flush()
            os.fsync(f.fileno())
        return path


def parse(data: bytes, where: str = "swarm key") -> bytes:
    """The 32-byte secret of a swarm key file's contents; ConfigError saying what is wrong otherwise."""
    bad = (f"swarm key {where} is not a swarm key file (expected the lines '{HEADER}', '/base16/' and 64 hex "
           "digits, as `swarm make-swarm-key` writes)")
    head, _, rest = data.partition(b"\n")
    if head.strip() != HEADER.encode():
        raise ConfigError(bad)
    encoding, _, body = rest.partition(b"\n")
    encoding = encoding.strip()
    try:
        if encoding == b"/base16/":
            secret = binascii.unhexlify(body.strip())
        elif encoding == b"/base64/":
            secret = base64.b64decode(body.strip(), validate=True)
        elif encoding == b"/bin/":
            secret = body
        else:
            raise ConfigError(bad)
    except (binascii.Error, ValueError):
        raise ConfigError(bad) from None
    if len(secret) != KEY_BYTES:
        raise ConfigError(f"swarm key {where} holds {len(secret)} bytes; a swarm key is {KEY_BYTES} bytes")
    return secret


def load_optional(value: str | os.PathLike | SwarmKey | None) -> SwarmKey | None:
    """A SwarmKey from a path or a key (None stays None): what `swarm_key=` arguments accept."""
    if value is None or isinstance(value, SwarmKey):
        return value
    if isinstance(value, str | Path | os.PathLike):
        return SwarmKey.load(value)
    raise ConfigError(f"swarm_key={value!r:.80}: expected a key file path or a SwarmKey")


def main(argv: list[str] | None = None) -> int:
    """`swarm make-swarm-key FILE`: a new swarm key; start the bootstrap, peers and clients with it."""
    p = argparse.ArgumentParser(prog="swarm make-swarm-key", description=main.__doc__.split(";")[0].split(": ")[1])
    p.add_argument("file", help="where to write the key (must not exist; written with mode 0600)")
    args = p.parse_args(argv)
    try:
        key = SwarmKey.generate()
        path = key.write(args.file)
    except ConfigError as e:
        print(f"swarm make-swarm-key: {e}", file=sys.stderr)
        return 1
    print(f"wrote a new swarm key to {path} (key id {key.key_id})")
    print(f"start the swarm with `swarm bootstrap --swarm-key {path}`, and give a copy of the file (privately) to "
          "every peer (`swarm peer --swarm-key FILE`) and client (`swarm generate --swarm-key FILE`) it admits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
