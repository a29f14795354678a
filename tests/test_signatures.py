"""swarm's hivemind-free readers of hivemind's formats, checked against hivemind itself.

The lite transport reads DHT records without hivemind: it checks owner signatures (swarm.signatures),
computes DHT ids (records.dht_key_id), speaks dht.proto / p2pd.proto (swarm.protos) and derives peer
ids (swarm.peerid). Each is compared here with hivemind's own code, both ways: what hivemind signs,
swarm accepts; what hivemind refuses, swarm refuses.
"""

from __future__ import annotations

import dataclasses

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.proto import dht_pb2, p2pd_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from swarm import protos, records, signatures
from swarm.identity import Identity
from swarm.records import BlockRecord, BlockState, record_subkey

BLOCK = BlockRecord(
    model_id="tiny", block=1, state=BlockState.ONLINE, start=0, end=4, software_version="0.1.0", protocol=1,
    dtype="float32", block_hash="ab" * 16, compute_tokens_s=100.0, network_mbps=0.0, cache_tokens_left=4096,
    addrs=("/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",),
)


@pytest.fixture(scope="module")
def alice():
    with Identity.load_or_create(None) as identity:
        yield identity


def _record(identity, block=BLOCK, expiration_s=30.0) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=records.record_key(block)).to_bytes(),
        subkey=MSGPackSerializer.dumps(record_subkey(block, identity)),
        value=MSGPackSerializer.dumps(block.to_wire()),
        expiration_time=get_dht_time() + expiration_s,
    )


def _ours(record: DHTRecord) -> bytes | None:
    return signatures.verify_and_strip(record.key, record.subkey, record.value, record.expiration_time)


def test_dht_key_id_is_hivemind_dhtid():
    for key in ("tiny.0", "swarm.models", "Llama-3-8B.31", "é.1"):
        assert records.dht_key_id(key) == DHTID.generate(source=key).to_bytes()


def test_what_hivemind_signs_swarm_accepts_and_strips_alike(alice):
    signer = RSASignatureValidator(alice.rsa_key)
    record = _record(alice)
    signed = dataclasses.replace(record, value=signer.sign_value(record))
    reader = RSASignatureValidator(RSAPrivateKey())  # another node's validator
    assert reader.validate(signed)
    assert _ours(signed) == reader.strip_value(signed) == record.value
    assert signatures.signed_bytes(record.key, record.subkey, record.value, record.expiration_time) == (
        MSGPackSerializer.dumps(dataclasses.astuple(record))
    )


def test_what_hivemind_refuses_swarm_refuses(alice):
    signer = RSASignatureValidator(alice.rsa_key)
    record = _record(alice)
    signed = dataclasses.replace(record, value=signer.sign_value(record))
    signature = signed.value[len(record.value):]
    other = _record(alice, dataclasses.replace(BLOCK, compute_tokens_s=1e9))
    mallory = RSASignatureValidator(RSAPrivateKey())
    cases = {
        "unsigned": record,
        "tampered value": dataclasses.replace(signed, value=other.value + signature),
        "other expiration": dataclasses.replace(signed, expiration_time=signed.expiration_time + 1),
        "two signatures": dataclasses.replace(signed, value=signed.value + signature),
        "signed by another key": dataclasses.replace(
            signed, value=record.value + mallory.sign_value(
                dataclasses.replace(record, subkey=record.subkey.replace(
                    alice.owner_marker.encode(), mallory.local_public_key)))[len(record.value):]),
        "garbage signature": dataclasses.replace(signed, value=record.value + b"[signature:!!notbase64]"),
    }
    reader = RSASignatureValidator(RSAPrivateKey())
    for name, case in cases.items():
        assert not reader.validate(case), name
        assert _ours(case) is None, name


def test_unprotected_records_pass_both_unchanged():
    record = DHTRecord(key=DHTID.generate(source="k").to_bytes(), subkey=MSGPackSerializer.dumps("plain"),
                       value=b"\x01\x02", expiration_time=get_dht_time() + 5)
    assert RSASignatureValidator(RSAPrivateKey()).validate(record)
    assert _ours(record) == record.value


def test_check_stored_is_the_validator_rule(alice):
    record = _record(alice)
    assert records.check_stored(record.key, record.subkey, record.value, record.expiration_time) == BLOCK
    assert records.SwarmRecordValidator().validate(record)
    wrong_key = dataclasses.replace(record, key=DHTID.generate(source="tiny.2").to_bytes())
    assert not records.SwarmRecordValidator().validate(wrong_key)


def test_own_protobufs_encode_as_hivemind_s():
    call = dict(peer=b"p", proto="DHTProtocol.rpc_find", data=b"d")
    ours = protos.PersistentConnectionRequest(callId=b"c" * 16, callUnary=protos.CallUnaryRequest(**call))
    theirs = p2pd_pb2.PersistentConnectionRequest(callId=b"c" * 16,
                                                  callUnary=p2pd_pb2.CallUnaryRequest(**call))
    assert ours.SerializeToString() == theirs.SerializeToString()
    answer = p2pd_pb2.PersistentConnectionRequest(
        callId=b"c" * 16, unaryResponse=p2pd_pb2.CallUnaryResponse(error=b"boom")).SerializeToString()
    decoded = protos.PersistentConnectionRequest.FromString(answer)
    assert decoded.unaryResponse.WhichOneof("result") == "error" and decoded.unaryResponse.error == b"boom"
    request = protos.FindRequest(keys=[b"k" * 20], peer=protos.NodeInfo()).SerializeToString()
    assert request == dht_pb2.FindRequest(keys=[b"k" * 20], peer=dht_pb2.NodeInfo()).SerializeToString()
    found = dht_pb2.FindResponse(results=[dht_pb2.FindResult(
        type=dht_pb2.FOUND_DICTIONARY, value=b"v", expiration_time=2.5, nearest_node_ids=[b"n" * 20],
        nearest_peer_ids=[b"q"])], peer=dht_pb2.NodeInfo(node_id=b"z" * 20)).SerializeToString()
    result = protos.FindResponse.FromString(found).results[0]
    assert (result.type, result.value, result.expiration_time) == (protos.FOUND_DICTIONARY, b"v", 2.5)


def test_peer_ids_match_p2pd_s(alice):
    from swarm import peerid

    assert peerid.peer_id_of_public_key(alice.private_key.public_key()) == alice.peer_id.to_base58()
    assert peerid.check_peer_id_text(alice.peer_id.to_base58()) == alice.peer_id.to_bytes()
