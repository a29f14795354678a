"""swarm.records: the strict record schema, the DHT validator, and announce/fetch on two real DHT nodes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math

import msgpack
import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from swarm.errors import ProtocolError, VersionMismatch
from swarm.identity import Identity
from swarm.net import _guard_unary_calls
from swarm.records import (
    MODELS_KEY,
    BlockRecord,
    BlockState,
    ModelRecord,
    Reachability,
    SwarmRecordValidator,
    _decode_entries,
    announce_blocks,
    announce_model,
    block_key,
    decode_entry,
    decode_record,
    fetch_blocks,
    fetch_models,
    make_record_validator,
    record_subkey,
)

HASH = "ab" * 32
BLOCK = BlockRecord(
    model_id="tiny-llama",
    block=1,
    state=BlockState.ONLINE,
    start=0,
    end=3,
    software_version="0.1.0",
    protocol=1,
    dtype="float32",
    block_hash=HASH,
    compute_tokens_s=1234.5,
    network_mbps=100.0,
    cache_tokens_left=8192,
    active_sessions=2,
    queued_tokens=17,
    reachability=Reachability.DIRECT,
    public_name="alice's gpu",
    addrs=(
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/1.2.3.4/tcp/5/p2p/QmZFfTcNBP5YFU8EWTX94ynW3jJBNQpwV8Ufqywb1RQMEr",
    ),
)
MODEL = ModelRecord(model_id="tiny-llama", num_blocks=4, repository="org/tiny-llama", config_hash="cd" * 32)


@pytest.fixture(scope="module")
def alice():
    with Identity.load_or_create(None) as identity:
        yield identity


@pytest.fixture(scope="module")
def mallory():
    with Identity.load_or_create(None) as identity:
        yield identity


def _through_msgpack(obj):
    return MSGPackSerializer.loads(MSGPackSerializer.dumps(obj))


# ---------------------------------------------------------------- schema (pure)


def test_block_record_round_trips_through_msgpack():
    wire = BLOCK.to_wire()
    assert wire["v"] == 1 and wire["kind"] == "block" and wire["state"] == "online"
    assert type(wire["state"]) is str and type(wire["addrs"]) is list  # hivemind packs with strict_types
    assert decode_record(_through_msgpack(wire)) == BLOCK
    assert BlockRecord.from_wire(_through_msgpack(wire)) == BLOCK


def test_model_record_round_trips_through_msgpack():
    assert decode_record(_through_msgpack(MODEL.to_wire())) == MODEL


def test_draining_record_round_trips_with_its_deadline():
    draining = dataclasses.replace(BLOCK, state=BlockState.DRAINING, drain_deadline=1.7e9)
    assert decode_record(_through_msgpack(draining.to_wire())) == draining


def test_unknown_fields_are_ignored_and_optional_fields_may_be_absent():
    wire = BLOCK.to_wire() | {"gpu": "H100", "future": {"nested": [1, 2]}}
    del wire["drain_deadline"]
    assert decode_record(wire) == BLOCK


def test_int_widens_to_float_but_bool_does_not():
    record = BlockRecord.from_wire(BLOCK.to_wire() | {"compute_tokens_s": 7})
    assert record.compute_tokens_s == 7.0 and type(record.compute_tokens_s) is float
    with pytest.raises(ProtocolError, match="compute_tokens_s"):
        BlockRecord.from_wire(BLOCK.to_wire() | {"compute_tokens_s": True})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"block": True}, "block"),
        ({"block": 1.0}, "block"),
        ({"block": "1"}, "block"),
        ({"protocol": False}, "protocol"),
        ({"model_id": 5}, "model_id"),
        ({"model_id": b"tiny-llama"}, "model_id"),
        ({"model_id": "../etc"}, "model_id"),
        ({"model_id": ""}, "model_id"),
        ({"dtype": b"float32"}, "dtype"),
        ({"dtype": "Float 32"}, "dtype"),
        ({"compute_tokens_s": math.nan}, "compute_tokens_s"),
        ({"compute_tokens_s": math.inf}, "compute_tokens_s"),
        ({"network_mbps": -math.inf}, "network_mbps"),
        ({"compute_tokens_s": -1.0}, "compute_tokens_s"),
        ({"compute_tokens_s": "fast"}, "compute_tokens_s"),
        ({"active_sessions": -1}, "active_sessions"),
        ({"queued_tokens": -5}, "queued_tokens"),
        ({"cache_tokens_left": -1}, "cache_tokens_left"),
        ({"cache_tokens_left": 1 << 60}, "cache_tokens_left"),
        ({"protocol": 1 << 20}, "protocol"),
        ({"start": 3, "end": 3}, "start"),
        ({"start": 2, "end": 1}, "start"),
        ({"start": -1}, "start"),
        ({"block": 3}, "block"),
        ({"block": -1}, "block"),
        ({"start": 2}, "block"),
        ({"state": "dead"}, "state"),
        ({"state": "ONLINE"}, "state"),
        ({"state": 1}, "state"),
        ({"reachability": "maybe"}, "reachability"),
        ({"state": "draining"}, "drain_deadline"),
        ({"state": "draining", "drain_deadline": math.nan}, "drain_deadline"),
        ({"drain_deadline": "soon"}, "drain_deadline"),
        ({"public_name": "x" * 65}, "public_name"),
        ({"public_name": "bad\nname"}, "public_name"),
        ({"software_version": "v" * 65}, "software_version"),
        ({"quant": "x" * 33}, "quant"),
        ({"addrs": ["/ip4/127.0.0.1/tcp/1"] * 17}, "addrs"),
        ({"addrs": ["/dns/" + "a" * 250 + "/tcp/1"]}, "addrs"),
        ({"addrs": ["hello"]}, "addrs"),
        ({"addrs": ["/ip4/999.1.1.1/tcp/1"]}, "addrs"),
        ({"addrs": "/ip4/127.0.0.1/tcp/1"}, "addrs"),
        ({"addrs": [b"/ip4/127.0.0.1/tcp/1"]}, "addrs"),
        ({"block_hash": HASH.upper()}, "block_hash"),
        ({"block_hash": HASH[:-1]}, "block_hash"),
        ({"block_hash": "zz" * 32}, "block_hash"),
    ],
)
def test_block_record_rejections_name_the_field(changes, field):
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        decode_record(_through_msgpack(BLOCK.to_wire() | changes))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": True}, "num_blocks"),
        ({"repository": "r" * 257}, "repository"),
        ({"config_hash": "not hex"}, "config_hash"),
        ({"model_id": "a/b"}, "model_id"),
    ],
)
def test_model_record_rejections_name_the_field(changes, field):
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        decode_record(MODEL.to_wire() | changes)


def test_missing_field_is_rejected():
    wire = BLOCK.to_wire()
    del wire["cache_tokens_left"]
    with pytest.raises(ProtocolError, match="missing field.*'cache_tokens_left'"):
        decode_record(wire)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([1, 2], "must be a map"),
        ("block", "must be a map"),
        ({"kind": "block"}, "'v'"),
        (BLOCK.to_wire() | {"v": True}, "'v'"),
        (BLOCK.to_wire() | {"v": "1"}, "'v'"),
        (BLOCK.to_wire() | {"v": 0}, "'v'"),
        (BLOCK.to_wire() | {"kind": "peer"}, "'kind'"),
        (BLOCK.to_wire() | {"kind": ["block"]}, "'kind'"),
    ],
)
def test_envelope_rejections(wire, message):
    with pytest.raises(ProtocolError, match=message):
        decode_record(wire)


def test_newer_schema_version_is_a_version_mismatch():
    with pytest.raises(VersionMismatch, match="v2 is newer than the v1"):
        decode_record(BLOCK.to_wire() | {"v": 2})


def test_kind_must_match_the_class():
    with pytest.raises(ProtocolError, match="'kind'"):
        ModelRecord.from_wire(BLOCK.to_wire())


def test_local_construction_runs_the_same_checks():
    with pytest.raises(ProtocolError, match="'block'"):
        dataclasses.replace(BLOCK, block=7)


# ---------------------------------------------------------------- subkeys and the validator (pure)


def _dht_record(key: str, subkey: str, value: object, expiration_s: float = 30.0) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=get_dht_time() + expiration_s,
    )


def test_decode_entry_binds_the_peer_id_to_the_owner_key(alice, mallory):
    subkey = record_subkey(BLOCK, alice)
    assert subkey == f"{alice.peer_id.to_base58()}{alice.owner_marker}"
    assert decode_entry(subkey, BLOCK.to_wire()) == (alice.peer_id.to_base58(), BLOCK)
    impostor = f"{alice.peer_id.to_base58()}{mallory.owner_marker}"
    with pytest.raises(ProtocolError, match="not its owner key"):
        decode_entry(impostor, BLOCK.to_wire())
    with pytest.raises(ProtocolError, match="subkey"):
        decode_entry(alice.peer_id.to_base58(), BLOCK.to_wire())  # no owner marker: unprotected
    with pytest.raises(ProtocolError, match="subkey"):
        decode_entry(record_subkey(MODEL, alice), BLOCK.to_wire())  # model-index layout for a block


def test_validator_accepts_only_well_formed_records_under_their_own_key(alice, mallory):
    validator = SwarmRecordValidator()
    key = block_key(BLOCK.model_id, BLOCK.block)
    good = _dht_record(key, record_subkey(BLOCK, alice), BLOCK.to_wire())
    assert validator.validate(good)
    assert validator.validate(_dht_record(MODELS_KEY, record_subkey(MODEL, alice), MODEL.to_wire()))

    refused = {
        "bad schema": _dht_record(key, record_subkey(BLOCK, alice), BLOCK.to_wire() | {"block": True}),
        "other block's key": _dht_record(
            block_key(BLOCK.model_id, 2), record_subkey(BLOCK, alice), BLOCK.to_wire()
        ),
        "model under a block key": _dht_record(key, record_subkey(MODEL, alice), MODEL.to_wire()),
        "impostor subkey": _dht_record(
            key, f"{alice.peer_id.to_base58()}{mallory.owner_marker}", BLOCK.to_wire()
        ),
        "unmarked subkey": _dht_record(key, alice.peer_id.to_base58(), BLOCK.to_wire()),
        "subkey not a str": _dht_record(key, 5, BLOCK.to_wire()),  # type: ignore[arg-type]
        "too far expiration": _dht_record(
            key, record_subkey(BLOCK, alice), BLOCK.to_wire(), expiration_s=1e6
        ),
        "not msgpack": dataclasses.replace(good, value=b"\xc1garbage"),
        "trailing bytes (unstripped signature)": dataclasses.replace(
            good, value=good.value + b"[signature:x]"
        ),
        "huge": dataclasses.replace(
            good, value=MSGPackSerializer.dumps(BLOCK.to_wire() | {"x": "y" * 20000})
        ),
        "ext type": dataclasses.replace(good, value=msgpack.packb(msgpack.ExtType(0x40, b"\x90"))),
    }
    for reason, record in refused.items():
        assert not validator.validate(record), reason


def test_validator_chain_checks_signatures_before_the_schema(alice, mallory):
    """Signed by alice's chain, accepted by mallory's; tampered or unsigned values are refused."""
    key = block_key(BLOCK.model_id, BLOCK.block)
    record = _dht_record(key, record_subkey(BLOCK, alice), BLOCK.to_wire())
    signed = dataclasses.replace(record, value=make_record_validator(alice).sign_value(record))
    assert signed.value != record.value
    reader = make_record_validator(mallory)
    assert reader.validate(signed)
    assert MSGPackSerializer.loads(reader.strip_value(signed)) == BLOCK.to_wire()
    assert not reader.validate(record)  # owner-marked but unsigned
    tampered = BLOCK.to_wire() | {"compute_tokens_s": 1e9}
    forged = dataclasses.replace(
        signed, value=MSGPackSerializer.dumps(tampered) + signed.value[len(record.value) :]
    )
    assert not reader.validate(forged)


def test_fetch_side_decoding_drops_what_it_cannot_trust(alice, mallory):
    key = block_key(BLOCK.model_id, BLOCK.block)
    fresh = get_dht_time() + 30

    def entry(value, expiration=fresh):
        return ValueWithExpiration(value, expiration)

    found = ValueWithExpiration(
        {
            record_subkey(BLOCK, alice): entry(BLOCK.to_wire()),
            record_subkey(BLOCK, mallory): entry(dataclasses.replace(BLOCK, block=2).to_wire()),  # other key
            f"{alice.peer_id.to_base58()}{mallory.owner_marker}": entry(BLOCK.to_wire()),  # impostor
            "garbage": entry(b"\x00"),
        },
        fresh,
    )
    assert _decode_entries(key, found) == [(alice.peer_id.to_base58(), BLOCK)]
    expired = ValueWithExpiration(
        {record_subkey(BLOCK, alice): entry(BLOCK.to_wire(), get_dht_time() - 1)}, fresh
    )
    assert _decode_entries(key, expired) == []
    assert _decode_entries(key, ValueWithExpiration(BLOCK.to_wire(), fresh)) == []  # a regular value
    assert _decode_entries(key, None) == []


# ---------------------------------------------------------------- two real DHT nodes on loopback


@contextlib.asynccontextmanager
async def _dht_node(identity: Identity, initial_peers=()):
    p2p = await P2P.create(
        initial_peers=list(initial_peers) or None,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=identity.p2pd_identity_path,
    )
    _guard_unary_calls(p2p)  # as start_p2p does: hivemind's ControlClient dies of a late answer without it
    try:
        node = await DHTNode.create(
            p2p=p2p,
            initial_peers=list(initial_peers) or None,
            record_validator=make_record_validator(identity),
        )
        try:
            yield node
        finally:
            await node.shutdown()
    finally:
        await p2p.shutdown()


async def _maddrs(node: DHTNode) -> list[str]:
    return [str(addr) for addr in await node.p2p.get_visible_maddrs()]


def test_records_announced_by_one_node_are_fetched_by_another(alice, mallory):
    async def scenario():
        async with _dht_node(alice) as node_a, _dht_node(mallory, await _maddrs(node_a)) as node_b:
            template = dataclasses.replace(BLOCK, block=0)
            assert await announce_blocks(node_a, alice, template, range(3), expiration_s=60) == dict.fromkeys(
                range(3), True
            )
            assert await announce_model(node_a, alice, MODEL, expiration_s=60)

            blocks = await fetch_blocks(node_b, "tiny-llama", 4, timeout_s=5)
            assert set(blocks) == {0, 1, 2, 3} and blocks[3] == {}
            for block in range(3):
                assert blocks[block] == {alice.peer_id.to_base58(): dataclasses.replace(BLOCK, block=block)}
            assert await fetch_models(node_b, timeout_s=5) == [MODEL]

            # a second peer on an overlapping span shows up next to the first
            theirs = dataclasses.replace(BLOCK, block=2, start=2, end=4, public_name="bob")
            assert await announce_blocks(node_b, mallory, theirs, [2, 3], expiration_s=60) == {
                2: True,
                3: True,
            }
            assert await announce_model(node_b, mallory, MODEL, expiration_s=60)
            blocks = await fetch_blocks(node_a, "tiny-llama", 4, timeout_s=5)
            assert set(blocks[2]) == {alice.peer_id.to_base58(), mallory.peer_id.to_base58()}
            assert blocks[3] == {mallory.peer_id.to_base58(): dataclasses.replace(theirs, block=3)}
            assert await fetch_models(node_a, timeout_s=5) == [MODEL]  # one entry per distinct record

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_nodes_refuse_malformed_records_and_foreign_overwrites(alice, mallory):
    async def scenario():
        async with _dht_node(alice) as node_a, _dht_node(mallory, await _maddrs(node_a)) as node_b:
            key = block_key(BLOCK.model_id, BLOCK.block)
            alice_subkey = record_subkey(BLOCK, alice)
            assert (await announce_blocks(node_a, alice, BLOCK, [BLOCK.block], expiration_s=60))[BLOCK.block]
            later = get_dht_time() + 120

            # a malformed record, even signed by the right owner, is stored nowhere
            bad = BLOCK.to_wire() | {"compute_tokens_s": "fast"}
            assert not await node_a.store(key, bad, later, subkey=alice_subkey)
            assert not await node_a.store(block_key(BLOCK.model_id, 2), bad, later, subkey=alice_subkey)
            assert await node_b.get(block_key(BLOCK.model_id, 2), latest=True) is None
            assert await node_a.get(block_key(BLOCK.model_id, 2), latest=True) is None

            # mallory cannot overwrite alice's subkey (unsigned), claim alice's peer id with her own key,
            # or file a record under a key it does not name
            forged = dataclasses.replace(BLOCK, compute_tokens_s=1e9).to_wire()
            impostor_subkey = f"{alice.peer_id.to_base58()}{mallory.owner_marker}"
            assert not await node_b.store(key, forged, later, subkey=alice_subkey)
            assert not await node_b.store(key, forged, later, subkey=impostor_subkey)
            other_block = dataclasses.replace(BLOCK, block=2).to_wire()
            assert not await node_b.store(key, other_block, later, subkey=record_subkey(BLOCK, mallory))

            for node in (node_a, node_b):
                blocks = await fetch_blocks(node, BLOCK.model_id, 2, timeout_s=5)
                assert blocks[BLOCK.block] == {alice.peer_id.to_base58(): BLOCK}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_restarted_peer_still_owns_its_records(tmp_path, mallory):
    path = str(tmp_path / "peer.key")

    async def scenario():
        async with _dht_node(mallory) as node_b:
            initial = await _maddrs(node_b)
            first = Identity.load_or_create(path)
            async with _dht_node(first, initial) as node_a:
                assert (await announce_blocks(node_a, first, BLOCK, [1], expiration_s=60))[1]
            again = Identity.load_or_create(path)
            draining = dataclasses.replace(
                BLOCK, state=BlockState.DRAINING, drain_deadline=get_dht_time() + 30
            )
            async with _dht_node(again, initial) as node_a:
                assert node_a.peer_id == first.peer_id
                assert (await announce_blocks(node_a, again, draining, [1], expiration_s=60))[1]
            blocks = await fetch_blocks(node_b, BLOCK.model_id, 2, timeout_s=5)
            assert blocks[1] == {first.peer_id.to_base58(): draining}

    asyncio.run(asyncio.wait_for(scenario(), 30))
