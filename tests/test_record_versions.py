"""Record schema versions, both directions: the schema 1.0 decoder (swarm/records.py as it was before 1.2,
read from git history) against today's records, and today's decoder against 1.0 records, newer minors and
a newer major.

Schema 1.2 adds optional fields only (`rtt_ms`, `next_start`, `next_end`) and a "minor" in the envelope:
a 1.0 reader must decode such a record to its known fields, and its DHT validator must accept it (hivemind
drops a key's whole dictionary when one entry fails validation, so a refusal there would hide every peer
of that block from old clients).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from swarm import records
from swarm.errors import ProtocolError, VersionMismatch
from swarm.identity import Identity
from swarm.records import BlockRecord, BlockState, block_key, decode_record, record_subkey

SCHEMA_1_0_COMMIT = "4eba106"  # the last commit whose swarm/records.py wrote schema 1.0 records
REPO = Path(__file__).resolve().parent.parent

RECORD = BlockRecord(
    model_id="tiny-llama",
    block=2,
    state=BlockState.ONLINE,
    start=1,
    end=4,
    software_version="0.1.0",
    protocol=1,
    dtype="float32",
    block_hash="ab" * 16,
    compute_tokens_s=900.0,
    network_mbps=250.0,
    cache_tokens_left=1024,
    addrs=("/ip4/127.0.0.1/tcp/4001",),
    rtt_ms=12.5,
)


@pytest.fixture(scope="module")
def old():
    """The schema 1.0 `swarm.records` module, loaded under another name beside today's."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{SCHEMA_1_0_COMMIT}:swarm/records.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"git history with commit {SCHEMA_1_0_COMMIT} is not available: {e}")
    assert "SCHEMA_VERSION = 1\n" in source and "SCHEMA_MINOR" not in source
    spec = importlib.util.spec_from_loader("records_schema_1_0", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        exec(compile(source, "records_schema_1_0.py", "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def alice():
    with Identity.load_or_create(None) as identity:
        yield identity


def test_a_schema_1_2_record_says_its_minor():
    wire = RECORD.to_wire()
    assert (wire["v"], wire["minor"]) == (1, records.SCHEMA_MINOR) and records.SCHEMA_MINOR >= 2
    assert wire["rtt_ms"] == 12.5 and wire["next_start"] is None


def test_an_old_reader_decodes_a_new_record_to_the_fields_it_knows(old):
    moving = dataclasses.replace(
        RECORD, state=BlockState.DRAINING, drain_deadline=1.8e9, next_start=0, next_end=3
    )
    for record in (RECORD, moving):
        decoded = old.decode_record(MSGPackSerializer.loads(MSGPackSerializer.dumps(record.to_wire())))
        known = {f.name for f in dataclasses.fields(decoded)}
        assert "rtt_ms" not in known and "next_start" not in known
        assert {name: getattr(record, name) for name in known} == {
            name: getattr(decoded, name) for name in known
        }


def test_an_old_dht_validator_accepts_a_new_record(old, alice):
    key = block_key(RECORD.model_id, RECORD.block)
    record = DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(record_subkey(RECORD, alice)),
        value=MSGPackSerializer.dumps(RECORD.to_wire()),
        expiration_time=get_dht_time() + 30,
    )
    assert old.SwarmRecordValidator().validate(record)
    assert records.SwarmRecordValidator().validate(record)


def test_a_schema_1_0_record_decodes_with_the_new_fields_unset(old):
    known = {f.name for f in dataclasses.fields(old.BlockRecord)}
    fields = {k: v for k, v in RECORD.to_wire().items() if k in known or k in ("v", "kind")}
    written_by_old = old.BlockRecord.from_wire(fields).to_wire()
    assert "minor" not in written_by_old and "rtt_ms" not in written_by_old
    decoded = decode_record(MSGPackSerializer.loads(MSGPackSerializer.dumps(written_by_old)))
    assert decoded == dataclasses.replace(RECORD, rtt_ms=None)
    assert decoded.next_span is None


def test_a_newer_minor_decodes_its_known_fields():
    wire = RECORD.to_wire() | {"minor": 7, "gpu_memory_bytes": 80 << 30, "regions": ["eu"]}
    assert decode_record(wire) == RECORD


def test_a_newer_major_is_refused_with_a_clear_error():
    with pytest.raises(
        VersionMismatch, match="schema v2 is newer than the v1 this software reads; upgrade swarm"
    ):
        decode_record(RECORD.to_wire() | {"v": 2})


@pytest.mark.parametrize("minor", [True, "2", -1, 1.0, 1 << 20])
def test_a_malformed_minor_is_refused(minor):
    with pytest.raises(ProtocolError, match="'minor'"):
        decode_record(RECORD.to_wire() | {"minor": minor})


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"next_start": 1}, "come together"),
        (
            {"next_start": 3, "next_end": 3, "state": BlockState.DRAINING, "drain_deadline": 1.8e9},
            "must be < next_end",
        ),
        ({"next_start": 0, "next_end": 2}, "only announced while the state is 'draining'"),
        ({"rtt_ms": -1.0}, "rtt_ms"),
        ({"rtt_ms": float("nan")}, "rtt_ms"),
    ],
)
def test_the_new_fields_are_checked(changes, problem):
    wire = RECORD.to_wire() | {k: (v.value if isinstance(v, BlockState) else v) for k, v in changes.items()}
    with pytest.raises(ProtocolError, match=problem):
        decode_record(wire)


def test_records_of_a_span_a_peer_left_are_dropped_once_it_announced_another():
    moved_from = dataclasses.replace(
        RECORD,
        block=0,
        start=0,
        end=2,
        state=BlockState.DRAINING,
        drain_deadline=1.8e9,
        next_start=1,
        next_end=4,
        rtt_ms=None,
    )
    now_on = [dataclasses.replace(RECORD, block=b) for b in (1, 2, 3)]
    other = dataclasses.replace(RECORD, block=0, start=0, end=1)
    entries = {
        0: {"a": (moved_from, 100.0), "b": (other, 50.0)},
        1: {"a": (now_on[0], 130.0)},
        2: {"a": (now_on[1], 130.0)},
        3: {"a": (now_on[2], 130.0)},
    }
    kept = records.drop_stale_spans(entries)
    assert kept[0] == {"b": (other, 50.0)}  # a's stale 0:2 record is gone, b's (its only span) stays
    assert [kept[b]["a"][0] for b in (1, 2, 3)] == now_on
