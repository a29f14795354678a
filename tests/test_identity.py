"""swarm.identity: one persistent RSA key = the libp2p peer id and the DHT record signer."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2

from swarm.errors import ConfigError
from swarm.identity import Identity, peer_id_of_ssh_key


def _public_key(identity: Identity) -> bytes:
    return identity.rsa_key.get_public_key().to_bytes()


def test_create_then_load_gives_the_same_key_and_a_private_file(tmp_path):
    path = str(tmp_path / "peer.key")
    created = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["peer.key"]  # no temp file left behind
    loaded = Identity.load_or_create(path)
    assert _public_key(loaded) == _public_key(created)
    assert loaded.peer_id == created.peer_id
    assert loaded.p2pd_identity_path == path and not loaded.is_ephemeral
    loaded.close()  # a persistent identity's file stays
    assert os.path.exists(path)


def test_the_peer_id_is_the_hash_of_the_signing_key(tmp_path):
    identity = Identity.load_or_create(str(tmp_path / "peer.key"))
    marker = identity.owner_marker
    assert marker.encode() == RSASignatureValidator(identity.rsa_key).local_public_key
    assert peer_id_of_ssh_key(marker[len("[owner:") : -1]) == identity.peer_id.to_base58()


def test_signatures_survive_a_reload(tmp_path):
    path = str(tmp_path / "peer.key")
    signature = Identity.load_or_create(path).rsa_key.sign(b"record")
    assert Identity.load_or_create(path).rsa_key.get_public_key().verify(b"record", signature)


def test_same_file_is_the_same_libp2p_peer_across_restarts(tmp_path):
    path = str(tmp_path / "peer.key")

    async def start_and_stop() -> str:
        identity = Identity.load_or_create(path)
        p2p = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=identity.p2pd_identity_path
        )
        try:
            assert p2p.peer_id == identity.peer_id
            return p2p.peer_id.to_base58()
        finally:
            await p2p.shutdown()

    first = asyncio.run(start_and_stop())
    second = asyncio.run(start_and_stop())
    assert first == second


def test_a_file_written_by_hivemind_is_accepted(tmp_path):
    path = str(tmp_path / "hivemind.key")
    P2P.generate_identity(path)  # mode 0400, the same format
    identity = Identity.load_or_create(path)
    assert identity.peer_id.to_base58() == peer_id_of_ssh_key(identity.owner_marker[7:-1])


def test_ephemeral_identity_uses_a_private_temp_file_removed_on_close():
    with Identity.load_or_create(None) as identity:
        path = identity.p2pd_identity_path
        assert identity.is_ephemeral
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)
    identity.close()  # idempotent


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00garbage\xff" * 10,
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=b"not a DER key").SerializeToString(),
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"x" * 64).SerializeToString(),
    ],
    ids=["empty", "garbage", "bad-der", "ed25519"],
)
def test_corrupt_file_is_a_config_error_and_is_not_overwritten(tmp_path, content):
    path = tmp_path / "peer.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="identity file"):
        Identity.load_or_create(str(path))
    assert path.read_bytes() == content


def test_truncated_key_is_a_config_error(tmp_path):
    good = tmp_path / "good.key"
    Identity.load_or_create(str(good))
    bad = tmp_path / "bad.key"
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ConfigError, match="not a valid libp2p RSA identity"):
        Identity.load_or_create(str(bad))


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Identity.load_or_create(str(tmp_path / "missing" / "peer.key"))
    with pytest.raises(ConfigError, match="not a regular file"):
        Identity.load_or_create(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "peer.key"
    Identity.load_or_create(str(path))
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read"):
        Identity.load_or_create(str(path))
