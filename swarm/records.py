"""DHT records: schema, strict decoding, the DHT validator, and announce/fetch over a hivemind DHTNode.

Layout on the DHT (hivemind dictionary values: key -> {subkey: value}):

    key f"{model_id}.{block}"   subkey f"{peer_id}[owner:ssh-rsa AAAA...]"              value BlockRecord
    key "swarm.models"          subkey f"{model_id}/{peer_id}[owner:ssh-rsa AAAA...]"   value ModelRecord
    key f"swarm.reports.{peer}" subkey f"{reporter_id}[owner:ssh-rsa AAAA...]"          value ReportRecord

`peer_id` is the base58 libp2p peer id and the marker is the peer's RSA public key (swarm.identity).
hivemind's RSASignatureValidator makes every write under a marked subkey carry a signature by that key;
`SwarmRecordValidator` additionally requires that the peer id is the hash of that key (so nobody can
publish under another peer's id), that the value is a well-formed record, and that the record's own
model_id/block hash to the DHT key it is stored under. Honest nodes refuse anything else on store and
drop it on read; `fetch_*` decode again and drop (never trust) whatever still fails.

Wire form of a record: a flat msgpack map {"v": 1, "minor": 2, "kind": "block" | "model", <field>: <value>,
...}. "v" is the schema's major version, "minor" (absent = 0) its additions. Unknown fields are ignored,
so a newer minor decodes here to the fields this software knows and an older one decodes with the
defaults of the fields it lacks (every field added after v1.0 is optional on the wire). A larger "v" is
refused (VersionMismatch, "upgrade swarm"): bump it only for changes old readers must not misread
(hivemind rejects a whole key's dictionary when one entry fails validation, so such a change also needs
new keys). Minor history: 1.0 the first schema; 1.2 adds `rtt_ms` and the destination of a peer that
drains to move (`next_start`, `next_end`), and `network_mbps` carries a measured figure; 1.3 adds the
precision a peer serves at: `weight_bits` (bits per weight of its linear layers, with `quant` naming the
scheme) and `kv_dtype` ("auto" = the dtype, or "fp8"); 1.4 adds report records (kind "report", a client's
signed word that a peer returned wrong results; older readers refuse the kind, and since reports
live under keys of their own no block or model key's dictionary ever holds one). Types are strict
(bool is not int, str is not bytes, a list is an array); the one widening is int -> float for float
fields, since msgpack writers may encode 100.0 as 100. NaN and infinities are refused. Every check
raises ProtocolError naming the field; local construction runs the same checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
from cryptography.exceptions import UnsupportedAlgorithm

from swarm.errors import ConfigError, ProtocolError, VersionMismatch
from swarm.peerid import peer_id_of_ssh_key
from swarm.spans import Span, check_model_id

if TYPE_CHECKING:  # hivemind's types, for the functions that run on a hivemind DHTNode only
    from hivemind.dht.node import DHTNode

    from swarm.identity import Identity

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # major: a reader refuses a larger one
SCHEMA_MINOR = 4  # additions within the major: optional fields, ignored by older readers
MODELS_KEY = "swarm.models"
REPORTS_KEY_PREFIX = "swarm.reports."
# a report lives at most this long after what it reports (its own `time`), and may not come from the future
REPORT_TTL_S = 3600.0
REPORT_CLOCK_SKEW_S = 300.0
MAX_WITNESSES = 4
MAX_RECORD_BYTES = 16 * 1024  # a full block record is < 5 KiB (16 addrs x 256 chars)
MAX_SUBKEY_BYTES = 2048  # model id + peer id + a 4096-bit OpenSSH key
MAX_EXPIRATION_S = 3600.0  # records are refreshed every few seconds; refuse near-immortal ones
MAX_ADDRS = 16
MAX_ADDR_CHARS = 256
DEFAULT_TIMEOUT_S = 10.0
_MAX_BLOCK = 1 << 20
_MAX_COUNT = 1 << 53  # exact in a float64, as any JSON consumer of the health API will hold it


class BlockState(StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class Reachability(StrEnum):
    DIRECT = "direct"
    RELAYED = "relayed"
    UNKNOWN = "unknown"


# ---------------------------------------------------------------- field checks (name, value) -> value


def _fail(kind: str, name: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{kind} record: field {name!r} {problem}")


def _int(lo: int, hi: int):
    def check(kind: str, name: str, value: object) -> int:
        if type(value) is not int:
            raise _fail(kind, name, f"must be an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise _fail(kind, name, f"must be in [{lo}, {hi}], got {value}")
        return value

    return check


def _float(lo: float, hi: float):
    def check(kind: str, name: str, value: object) -> float:
        if type(value) not in (float, int):  # int widens to float (see module docstring); bool does not
            raise _fail(kind, name, f"must be a float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise _fail(kind, name, f"must be a finite number in [{lo:g}, {hi:g}], got {value}")
        return value

    return check


def _optional(check):
    def optional(kind: str, name: str, value: object):
        return None if value is None else check(kind, name, value)

    return optional


def _str(max_chars: int, pattern: str | None = None, *, printable: bool = True):
    regex = re.compile(pattern) if pattern else None

    def check(kind: str, name: str, value: object) -> str:
        if type(value) is not str:
            raise _fail(kind, name, f"must be a str, got {type(value).__name__}")
        if len(value) > max_chars:
            raise _fail(kind, name, f"is longer than {max_chars} characters")
        if (regex and not regex.fullmatch(value)) or (printable and not value.isprintable()):
            raise _fail(kind, name, f"has an invalid format: {value[:80]!r}")
        return value

    return check


def _enum(enum_type: type[StrEnum]):
    def check(kind: str, name: str, value: object) -> StrEnum:
        if isinstance(value, enum_type):
            return value
        allowed = [member.value for member in enum_type]
        if type(value) is not str or value not in allowed:
            raise _fail(kind, name, f"must be one of {', '.join(allowed)}; got {value!r:.80}")
        return enum_type(value)

    return check


def _model_id(kind: str, name: str, value: object) -> str:
    _str(96)(kind, name, value)
    try:
        return check_model_id(value)
    except ConfigError as e:
        raise _fail(kind, name, f"is not a valid model id: {value!r}") from e


@functools.lru_cache(maxsize=1)
def _multiaddr_parser():
    """(Multiaddr class, its parse errors): py-multiaddr where it is installed (the lite install has it, as
    py-libp2p's dependency), else hivemind's vendored copy of the same library. Either parses the text
    form alone (no DNS), so records decode alike on both transports (tests/test_lite.py checks)."""
    try:
        from multiaddr import Multiaddr
        from multiaddr.exceptions import Error
    except ImportError:
        from hivemind.utils.multiaddr import Multiaddr
        from hivemind.utils.multiaddr.exceptions import Error
    return Multiaddr, (Error, ValueError, KeyError, IndexError, TypeError)


def _is_multiaddr(addr: str) -> bool:
    multiaddr, errors = _multiaddr_parser()
    try:
        multiaddr(addr)
    except errors:
        return False
    return True


def _addrs(kind: str, name: str, value: object) -> tuple[str, ...]:
    if type(value) not in (list, tuple):
        raise _fail(kind, name, f"must be a list of multiaddr strings, got {type(value).__name__}")
    if len(value) > MAX_ADDRS:
        raise _fail(kind, name, f"has {len(value)} entries, at most {MAX_ADDRS} allowed")
    check_one = _str(MAX_ADDR_CHARS, r"/[\x21-\x7e]+")
    for addr in value:
        check_one(kind, name, addr)
        if not _is_multiaddr(addr):
            raise _fail(kind, name, f"holds an invalid multiaddr {addr!r}")
    return tuple(value)


_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
_HEX_DIGEST = r"(?:[0-9a-f]{2}){8,64}"  # lowercase hex of 8..64 bytes (swarm.runtime: sha256 cut to 16)
_TOKEN = r"[a-z0-9_]{1,32}"


# ---------------------------------------------------------------- records


class _Record:
    """Shared machinery: per-field checks in __post_init__, strict from_wire, plain to_wire."""

    KIND: ClassVar[str]
    _CHECKS: ClassVar[dict[str, Any]]
    _OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name, check in self._CHECKS.items():
            object.__setattr__(self, name, check(self.KIND, name, getattr(self, name)))
        self._check_fields_together()

    def _check_fields_together(self) -> None:
        pass

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map: plain str/int/float/list/None only (hivemind packs with strict_types)."""
        wire: dict[str, Any] = {"v": SCHEMA_VERSION, "minor": SCHEMA_MINOR, "kind": self.KIND}
        for name in self._CHECKS:
            value = getattr(self, name)
            if isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            wire[name] = value
        return wire

    @classmethod
    def from_wire(cls, obj: object):
        """Decode a wire map; raises ProtocolError (VersionMismatch for a newer schema) naming the field."""
        obj, _ = _check_envelope(obj, (cls.KIND,))
        missing = [name for name in cls._CHECKS if name not in obj and name not in cls._OPTIONAL_ON_WIRE]
        if missing:
            raise ProtocolError(f"{cls.KIND} record: missing field(s) {', '.join(map(repr, missing))}")
        return cls(**{name: obj[name] for name in cls._CHECKS if name in obj})


def _check_envelope(obj: object, kinds: Sequence[str]) -> tuple[dict[Any, Any], str]:
    """Check the map, its schema version and its kind; returns (the map, its kind)."""
    if type(obj) is not dict:
        raise ProtocolError(f"record must be a map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError(
            f"record: field 'v' (schema version) must be an int, got {type(version).__name__}"
        )
    if version > SCHEMA_VERSION:
        raise VersionMismatch(
            f"record schema v{version} is newer than the v{SCHEMA_VERSION} this software reads; upgrade swarm"
        )
    if version < 1:
        raise ProtocolError(f"record: field 'v' must be >= 1, got {version}")
    minor = obj.get("minor", 0)
    if type(minor) is not int or not 0 <= minor <= 65535:
        raise ProtocolError(f"record: field 'minor' (schema minor version) must be an int in [0, 65535], got {minor!r:.40}")
    kind = obj.get("kind")
    if type(kind) is not str or kind not in kinds:
        raise ProtocolError(f"record: field 'kind' must be {' or '.join(map(repr, kinds))}, got {kind!r:.40}")
    return obj, kind


@dataclass(frozen=True)
class BlockRecord(_Record):
    """One peer's announcement for one block of a model: key f"{model_id}.{block}"."""

    KIND: ClassVar[str] = "block"

    model_id: str
    block: int
    state: BlockState
    start: int  # the peer's whole span [start, end), so one record tells the route planner the span
    end: int
    software_version: str
    protocol: int  # major version of the swarm.vN.* handlers
    dtype: str  # torch dtype name of the served weights, e.g. "bfloat16"
    block_hash: str  # lowercase hex digest of this block's tensors as loaded
    compute_tokens_s: float  # measured forward throughput of the span
    network_mbps: float  # measured network bandwidth to the peers it talks to, megabits per second; 0 = not measured
    cache_tokens_left: int
    quant: str = "none"
    active_sessions: int = 0
    queued_tokens: int = 0
    reachability: Reachability = Reachability.UNKNOWN
    public_name: str = ""
    addrs: tuple[str, ...] = ()  # multiaddrs the peer can be dialed at
    direct: tuple[str, ...] = ()  # /ip4|ip6/HOST/tcp/PORT of its direct TLS streams (swarm.direct); optional
    drain_deadline: float | None = None  # unix time (s) the peer leaves; required while draining
    # since schema 1.2 (absent from older records)
    rtt_ms: float | None = None  # median round trip to the peers it talks to, milliseconds; None = not measured
    next_start: int | None = None  # while draining to move (rebalancing): the span it will serve next
    next_end: int | None = None
    # since schema 1.3 (absent from older records: read as the dtype's own bits, KV in the dtype)
    weight_bits: int | None = None
    kv_dtype: str | None = None

    _CHECKS: ClassVar[dict[str, Any]] = {
        "model_id": _model_id,
        "block": _int(0, _MAX_BLOCK - 1),
        "state": _enum(BlockState),
        "start": _int(0, _MAX_BLOCK - 1),
        "end": _int(1, _MAX_BLOCK),
        "software_version": _str(64, r"[\x21-\x7e]+"),
        "protocol": _int(0, 65535),
        "dtype": _str(32, _TOKEN),
        "block_hash": _str(128, _HEX_DIGEST),
        "compute_tokens_s": _float(0.0, 1e12),
        "network_mbps": _float(0.0, 1e9),
        "cache_tokens_left": _int(0, _MAX_COUNT),
        "quant": _str(32, _TOKEN),
        "active_sessions": _int(0, _MAX_COUNT),
        "queued_tokens": _int(0, _MAX_COUNT),
        "reachability": _enum(Reachability),
        "public_name": _str(64),
        "addrs": _addrs,
        "direct": _addrs,
        "drain_deadline": _optional(_float(1.0, 1e11)),
        "rtt_ms": _optional(_float(0.0, 1e7)),
        "next_start": _optional(_int(0, _MAX_BLOCK - 1)),
        "next_end": _optional(_int(1, _MAX_BLOCK)),
        "weight_bits": _optional(_int(1, 64)),
        "kv_dtype": _optional(_str(32, _TOKEN)),
    }
    _OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset(
        {"direct", "drain_deadline", "rtt_ms", "next_start", "next_end", "weight_bits", "kv_dtype"}
    )

    def _check_fields_together(self) -> None:
        if self.start >= self.end:
            raise _fail(self.KIND, "start", f"must be < end, got span [{self.start}, {self.end})")
        if not self.start <= self.block < self.end:
            raise _fail(self.KIND, "block", f"{self.block} lies outside the span [{self.start}, {self.end})")
        if self.state == BlockState.DRAINING and self.drain_deadline is None:
            raise _fail(self.KIND, "drain_deadline", "is required while the state is 'draining'")
        if (self.next_start is None) != (self.next_end is None):
            raise _fail(self.KIND, "next_start", "and 'next_end' come together or not at all")
        if self.next_start is not None:
            if self.next_start >= self.next_end:
                raise _fail(self.KIND, "next_start", f"must be < next_end, got [{self.next_start}, {self.next_end})")
            if self.state != BlockState.DRAINING:
                raise _fail(self.KIND, "next_start", "is only announced while the state is 'draining'")

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

    @property
    def precision_bits(self) -> int:
        """The lowest precision on this peer's path, in bits: its weights' (`weight_bits`, else its dtype's)
        or its KV cache's (8 for fp8), whichever is lower. 16 or more = full precision."""
        bits = self.weight_bits if self.weight_bits is not None else _DTYPE_BITS.get(self.dtype, 16)
        if self.quant != "none" and self.weight_bits is None:
            bits = min(bits, 8)  # a quantized peer from before 1.3 that said only its scheme
        return min(bits, 8) if self.kv_dtype == "fp8" else bits

    @property
    def next_span(self) -> Span | None:
        """Where a peer that drains to move goes next (None: it leaves, or it is not draining)."""
        return None if self.next_start is None else Span(self.next_start, self.next_end)


@dataclass(frozen=True)
class ModelRecord(_Record):
    """One peer's entry in the model index (key MODELS_KEY): which model it serves and where it came from."""

    KIND: ClassVar[str] = "model"

    model_id: str
    num_blocks: int
    repository: str  # the source checkpoint (hub name or folder name), informational
    config_hash: str  # lowercase hex digest of the model config: tells two fine-tunes with one name apart

    _CHECKS: ClassVar[dict[str, Any]] = {
        "model_id": _model_id,
        "num_blocks": _int(1, _MAX_BLOCK),
        "repository": _str(256),
        "config_hash": _str(128, _HEX_DIGEST),
    }


_PEER_ID = r"[1-9A-HJ-NP-Za-km-z]{1,128}"  # base58


def _peer_ids(kind: str, name: str, value: object) -> tuple[str, ...]:
    if type(value) not in (list, tuple):
        raise _fail(kind, name, f"must be a list of peer ids, got {type(value).__name__}")
    if len(value) > MAX_WITNESSES:
        raise _fail(kind, name, f"has {len(value)} entries, at most {MAX_WITNESSES} allowed")
    check_one = _str(128, _PEER_ID)
    return tuple(check_one(kind, name, peer) for peer in value)


@dataclass(frozen=True)
class ReportRecord(_Record):
    """A client's signed statement "peer `accused` returned wrong results for blocks [start, end) of
    `model_id`": key f"swarm.reports.{accused}", subkey f"{reporter}[owner:<reporter's key>]".

    The subkey's owner marker makes hivemind check the reporter's signature, and the validator checks that
    the subkey's peer id is `reporter` and the hash of that key: nobody reports in another's name. One
    subkey per (reporter, accused): a reporter holds at most one live report on a peer however often it
    writes (a rewrite replaces it), and a report expires at most REPORT_TTL_S after its `time`. What a
    report proves is only that its reporter says so: clients never act on reports (client.verify bans
    on its own checks only); the health page counts distinct reporters (bootstrap.health.reports).
    """

    KIND: ClassVar[str] = "report"

    model_id: str
    accused: str  # base58 peer id of the peer whose results were wrong
    start: int  # the blocks it ran wrongly, [start, end)
    end: int
    reporter: str  # base58 peer id of the reporting client (the subkey's owner)
    time: float  # unix time (s) of the check that outvoted it
    evidence: str  # lowercase hex sha256 of inputs and both outputs (client.verify.evidence_digest)
    position: int = 0  # first wrong position of the session it served
    rel_error: float = 0.0  # relative L2 error of its first wrong token against the majority
    witnesses: tuple[str, ...] = ()  # peers whose results agreed with each other and not with the accused

    _CHECKS: ClassVar[dict[str, Any]] = {
        "model_id": _model_id,
        "accused": _str(128, _PEER_ID),
        "start": _int(0, _MAX_BLOCK - 1),
        "end": _int(1, _MAX_BLOCK),
        "reporter": _str(128, _PEER_ID),
        "time": _float(1.0, 1e11),
        "evidence": _str(128, _HEX_DIGEST),
        "position": _int(0, _MAX_COUNT),
        "rel_error": _float(0.0, 1e30),
        "witnesses": _peer_ids,
    }
    _OPTIONAL_ON_WIRE: ClassVar[frozenset[str]] = frozenset({"position", "rel_error", "witnesses"})

    def _check_fields_together(self) -> None:
        if self.start >= self.end:
            raise _fail(self.KIND, "start", f"must be < end, got blocks [{self.start}, {self.end})")
        if self.accused == self.reporter:
            raise _fail(self.KIND, "reporter", "is the accused peer itself")
        if self.accused in self.witnesses:
            raise _fail(self.KIND, "witnesses", "include the accused peer")

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)


_RECORD_TYPES: dict[str, type[_Record]] = {"block": BlockRecord, "model": ModelRecord, "report": ReportRecord}
Record = BlockRecord | ModelRecord | ReportRecord


def decode_record(obj: object) -> Record:
    """Decode any swarm record from its wire map (dispatch on 'kind'); raises ProtocolError."""
    _, kind = _check_envelope(obj, tuple(_RECORD_TYPES))
    return _RECORD_TYPES[kind].from_wire(obj)


# ---------------------------------------------------------------- keys and subkeys


def block_key(model_id: str, block: int) -> str:
    return f"{model_id}.{block}"


def report_key(accused: str) -> str:
    """The DHT key of the reports on peer `accused`."""
    return f"{REPORTS_KEY_PREFIX}{accused}"


def record_key(record: Record) -> str:
    """The DHT key a record belongs under."""
    if isinstance(record, ReportRecord):
        return report_key(record.accused)
    return block_key(record.model_id, record.block) if isinstance(record, BlockRecord) else MODELS_KEY


def record_subkey(record: Record, identity: Identity) -> str:
    """The owner-marked subkey under which `identity` publishes `record`."""
    owned = f"{identity.peer_id.to_base58()}{identity.owner_marker}"
    return f"{record.model_id}/{owned}" if isinstance(record, ModelRecord) else owned


_PEER_AND_OWNER = r"(?P<peer>[1-9A-HJ-NP-Za-km-z]{1,128})\[owner:(?P<key>ssh-rsa [A-Za-z0-9+/]+={0,2})\]"
_BLOCK_SUBKEY_RE = re.compile(_PEER_AND_OWNER)
_MODEL_SUBKEY_RE = re.compile(r"(?P<model>[A-Za-z0-9._-]{1,96})/" + _PEER_AND_OWNER)


def decode_entry(subkey: object, value: object) -> tuple[str, Record]:
    """Check one (subkey, value) pair as hivemind returns it; returns (peer_id, record).

    Raises ProtocolError unless the value is a valid record, the subkey has the layout of its kind,
    and the subkey's peer id is the hash of the subkey's owner key. The caller checks the DHT key.
    """
    record = decode_record(value)
    if type(subkey) is not str:
        raise ProtocolError(f"subkey must be a str, got {type(subkey).__name__}")
    pattern = _MODEL_SUBKEY_RE if isinstance(record, ModelRecord) else _BLOCK_SUBKEY_RE
    match = pattern.fullmatch(subkey)
    if match is None:
        raise ProtocolError(f"{record.KIND} record: subkey {subkey[:80]!r} is not '<peer id>[owner:<key>]'")
    if isinstance(record, ReportRecord) and match["peer"] != record.reporter:
        raise ProtocolError(
            f"report record: subkey peer {match['peer']} is not its reporter {record.reporter}")
    if isinstance(record, ModelRecord) and match["model"] != record.model_id:
        raise ProtocolError(
            f"model record: subkey names {match['model']!r} but the record {record.model_id!r}"
        )
    try:
        owner_peer_id = peer_id_of_ssh_key(match["key"])
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ProtocolError(f"{record.KIND} record: subkey owner is not an RSA public key") from e
    if owner_peer_id != match["peer"]:
        raise ProtocolError(
            f"{record.KIND} record: subkey peer id {match['peer']} is not its owner key's ({owner_peer_id})"
        )
    return match["peer"], record


def _unpack(data: bytes, what: str, max_bytes: int) -> object:
    if len(data) > max_bytes:
        raise ProtocolError(f"{what} is {len(data)} bytes, at most {max_bytes} allowed")
    try:  # no ext_hook: ext types stay msgpack.ExtType and fail the type checks
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise ProtocolError(f"{what} is not valid msgpack ({type(e).__name__})") from e


# ---------------------------------------------------------------- the DHT validator


def dht_key_id(key: str) -> bytes:
    """The 20-byte DHT id hivemind files `key` under (DHTID.generate(source=key).to_bytes()): the sha1
    of the key's msgpack form."""
    return hashlib.sha1(msgpack.packb(key, use_bin_type=True)).digest()


def check_stored(key_id: bytes, subkey: bytes, value: bytes, expiration_time: float) -> Record:
    """Check one stored entry as the DHT holds it (key id, msgpack subkey, msgpack value without its
    signature, expiration); returns the record, raises ProtocolError naming what is wrong: a malformed
    record or subkey, a record under a key other than the one its content names, an expiration more
    than MAX_EXPIRATION_S away. What SwarmRecordValidator accepts on store, and swarm.lite on read."""
    decoded_subkey = _unpack(subkey, "subkey", MAX_SUBKEY_BYTES)
    _, decoded = decode_entry(decoded_subkey, _unpack(value, "record", MAX_RECORD_BYTES))
    if dht_key_id(record_key(decoded)) != key_id:
        raise ProtocolError(f"{decoded.KIND} record is stored under a key other than {record_key(decoded)!r}")
    if expiration_time > time.time() + MAX_EXPIRATION_S:
        raise ProtocolError(f"record expires more than {MAX_EXPIRATION_S:g} s from now")
    if isinstance(decoded, ReportRecord):
        if decoded.time > time.time() + REPORT_CLOCK_SKEW_S:
            raise ProtocolError("report record: its time lies in the future")
        if expiration_time > decoded.time + REPORT_TTL_S:
            raise ProtocolError(f"report record expires more than {REPORT_TTL_S:g} s after its time")
    return decoded


class SwarmRecordValidator:
    """Accepts only well-formed swarm records, owner-marked, under the key their content names.

    A hivemind record validator (RecordValidatorBase's interface, duck-typed so that this module
    imports no hivemind): sees what hivemind passes validators, key = DHTID bytes (the sha1 of the
    packed key string, so the expected key is recomputed from the record), subkey and value as msgpack
    bytes. Priority 0 < 10 of RSASignatureValidator: validation runs in decreasing priority, so the
    signature is checked and stripped before this sees the value. Use it with RSASignatureValidator
    (make_record_validator): alone it would check ownership markers but no signatures. Never raises.
    """

    def validate(self, record) -> bool:
        try:
            check_stored(record.key, record.subkey, record.value, record.expiration_time)
        except ProtocolError as e:
            logger.debug("refusing a DHT record: %s", e)
            return False
        return True

    def sign_value(self, record) -> bytes:
        return record.value

    def strip_value(self, record) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 0

    def merge_with(self, other) -> bool:
        return isinstance(other, SwarmRecordValidator)


def make_record_validator(identity: Identity):
    """The validator chain every swarm DHTNode runs: signatures by `identity`'s key, then the schema."""
    from hivemind.dht.crypto import RSASignatureValidator  # the hivemind transport's half of this module
    from hivemind.dht.validation import CompositeValidator

    return CompositeValidator([RSASignatureValidator(identity.rsa_key), SwarmRecordValidator()])


# ---------------------------------------------------------------- announce / fetch


async def announce_blocks(
    node: DHTNode,
    identity: Identity,
    record_template: BlockRecord,
    blocks: Iterable[int],
    expiration_s: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[int, bool]:
    """Store one record per block (the template with `block` replaced), expiring in `expiration_s`.

    Returns {block: stored}. hivemind reports per (key, subkey) the status of the last replica that
    answered; False also means "not confirmed in time". Raises ConfigError if `node` does not run
    with `identity`, ProtocolError if a block lies outside the template's span.
    """
    records = [dataclasses.replace(record_template, block=block) for block in blocks]
    stored = await _store(node, identity, records, expiration_s, timeout_s)
    return {record.block: ok for record, ok in zip(records, stored, strict=True)}


async def announce_records(
    node: DHTNode,
    identity: Identity,
    records: Sequence[BlockRecord],
    expiration_s: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[bool]:
    """Store ready-made block records (one per block, e.g. each with its own block_hash); see announce_blocks."""
    return await _store(node, identity, records, expiration_s, timeout_s)


async def announce_model(
    node: DHTNode,
    identity: Identity,
    record: ModelRecord,
    expiration_s: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """Store this peer's entry in the model index; returns whether a replica accepted it."""
    return (await _store(node, identity, [record], expiration_s, timeout_s))[0]


async def announce_report(
    node: DHTNode, identity: Identity, report: ReportRecord, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> bool:
    """Store `report` (its `reporter` must be `identity`'s peer id) until REPORT_TTL_S after its time;
    returns whether a replica accepted it. Raises ConfigError for a report in another's name or one too old
    to store."""
    if report.reporter != identity.peer_id.to_base58():
        raise ConfigError(f"a report by {report.reporter} cannot be signed as {identity.peer_id}")
    # a second early: the node stamps its expiration a moment after this, and it may not pass time + TTL
    expiration_s = min(MAX_EXPIRATION_S, report.time + REPORT_TTL_S - time.time() - 1.0)
    if expiration_s <= 0:
        raise ConfigError(f"a report of {report.time:.0f} is past its {REPORT_TTL_S:g} s lifetime")
    return (await _store(node, identity, [report], expiration_s, timeout_s))[0]


async def fetch_reports(
    node: DHTNode, peer_ids: Iterable[str], *, timeout_s: float = DEFAULT_TIMEOUT_S, latest: bool = True
) -> dict[str, dict[str, ReportRecord]]:
    """The live, valid reports on each of `peer_ids`: {accused: {reporter: report}} (peers nobody reported
    are left out). Entries that fail decoding or name another key are dropped, as in fetch_blocks."""
    keys = {report_key(peer): peer for peer in peer_ids}
    found = await _get_many(node, list(keys), timeout_s, latest)
    out: dict[str, dict[str, ReportRecord]] = {}
    for key, peer in keys.items():
        entries = _decode_entries(key, found.get(key))
        reports = {reporter: r for reporter, r in entries if isinstance(r, ReportRecord)}
        if reports:
            out[peer] = reports
    return out


async def _store(
    node: DHTNode, identity: Identity, records: Sequence[Record], expiration_s: float, timeout_s: float
) -> list[bool]:
    if node.peer_id != identity.peer_id:
        raise ConfigError(
            f"DHT node runs as {node.peer_id} but records are signed as {identity.peer_id}: "
            "start P2P with identity_path=identity.p2pd_identity_path"
        )
    if not 0 < expiration_s <= MAX_EXPIRATION_S:
        raise ConfigError(f"record expiration {expiration_s} s is outside (0, {MAX_EXPIRATION_S:g}]")
    if not records:
        return []
    keys = [record_key(record) for record in records]
    subkeys = [record_subkey(record, identity) for record in records]
    expiration_time = time.time() + expiration_s  # hivemind's get_dht_time
    try:
        result = await asyncio.wait_for(
            node.store_many(keys, [r.to_wire() for r in records], expiration_time, subkeys=subkeys), timeout_s
        )
    except TimeoutError:
        logger.warning("storing %d DHT record(s) did not finish in %.1f s", len(records), timeout_s)
        return [False] * len(records)
    return [bool(result.get((key, subkey))) for key, subkey in zip(keys, subkeys, strict=True)]


async def fetch_blocks(
    node: DHTNode,
    model_id: str,
    num_blocks: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    latest: bool = True,
    blocks: range | None = None,
    quorum: bool = True,
) -> dict[int, dict[str, BlockRecord]]:
    """Every block's valid records, {block: {peer_id: record}} (an empty dict where nobody serves it);
    `blocks`: only these blocks (default: all `num_blocks`).

    Entries that fail decoding, name another model/block than their key, or whose subkey peer id
    does not match its owner key are dropped (logged at debug). Keys whose lookup does not finish
    within `timeout_s` come back empty. latest=True merges what the nodes nearest each key hold (a quorum
    read, swarm.dhtread; `quorum=False`: hivemind's traversal of the whole beam); False stops at the first
    node that has the key.
    """
    entries = await fetch_block_entries(node, model_id, num_blocks, timeout_s=timeout_s, latest=latest, blocks=blocks,
                                        quorum=quorum)
    return {block: {peer_id: record for peer_id, (record, _) in found.items()} for block, found in entries.items()}


async def fetch_block_entries(
    node: DHTNode,
    model_id: str,
    num_blocks: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    latest: bool = True,
    blocks: range | None = None,
    quorum: bool = True,
) -> dict[int, dict[str, tuple[BlockRecord, float]]]:
    """As fetch_blocks, with each record's DHT expiration time: {block: {peer_id: (record, expiration)}}.

    A peer's records of different blocks may disagree (stale ones of a span it served before); the one
    that expires last is the one it announced last (every announce stores all its blocks with one
    expiration, and hivemind keeps the later expiration of a subkey)."""
    check_model_id(model_id)
    blocks = range(num_blocks) if blocks is None else blocks
    keys = {block_key(model_id, block): block for block in blocks}
    found = await _get_many(node, list(keys), timeout_s, latest, quorum)
    return drop_stale_spans({
        block: {
            peer_id: (record, expiration)
            for peer_id, record, expiration in _decode_entries(key, found.get(key), with_expiration=True)
            if isinstance(record, BlockRecord)
        }
        for key, block in keys.items()
    })


def drop_stale_spans(
    entries: dict[int, dict[str, tuple[BlockRecord, float]]],
) -> dict[int, dict[str, tuple[BlockRecord, float]]]:
    """Leave out each peer's records of a span other than the one of its record that expires last: a
    peer that moved (rebalancing) or restarted on other blocks leaves records of its old span behind
    until they expire, and they would say it is draining or serves blocks it no longer holds. Only the
    blocks read count: a peer's freshest record among them decides."""
    latest: dict[str, tuple[float, Span]] = {}
    for block_entries in entries.values():
        for peer_id, (record, expiration) in block_entries.items():
            if peer_id not in latest or expiration > latest[peer_id][0]:
                latest[peer_id] = (expiration, record.span)
    return {
        block: {pid: entry for pid, entry in block_entries.items() if entry[0].span == latest[pid][1]}
        for block, block_entries in entries.items()
    }


async def fetch_models(
    node: DHTNode, *, timeout_s: float = DEFAULT_TIMEOUT_S, latest: bool = True
) -> list[ModelRecord]:
    """The distinct model index entries, sorted by model id (several peers announce the same model)."""
    found = await _get_many(node, [MODELS_KEY], timeout_s, latest)
    records = {
        record
        for _, record in _decode_entries(MODELS_KEY, found.get(MODELS_KEY))
        if isinstance(record, ModelRecord)
    }
    return sorted(records, key=lambda r: (r.model_id, r.num_blocks, r.config_hash, r.repository))


async def _get_many(node: DHTNode, keys: list[str], timeout_s: float, latest: bool,
                    quorum: bool = True) -> dict[str, object]:
    """{key: hivemind's ValueWithExpiration or None}; lookups unfinished after `timeout_s` are cancelled.
    latest=True reads each key from a quorum of its replicas (swarm.dhtread) unless `quorum` is False
    (then hivemind's traversal of the whole beam); latest=False: hivemind's read, which stops at the
    first node holding the key."""
    if not keys:
        return {}
    if latest and quorum and hasattr(node, "protocol"):  # a hivemind DHTNode (swarm.lite's reader has its own search)
        from swarm.dhtread import read_latest  # hivemind is imported only where a node exists

        return await read_latest(node, keys, timeout_s)
    futures = await node.get_many(
        keys, sufficient_expiration_time=float("inf") if latest else None, return_futures=True
    )
    done, pending = await asyncio.wait(futures.values(), timeout=timeout_s)
    for future in pending:
        future.cancel()
    if pending:
        logger.debug("%d of %d DHT lookups did not finish in %.1f s", len(pending), len(keys), timeout_s)
    results: dict[str, object] = {}
    for key, future in futures.items():
        if future in done and not future.cancelled() and future.exception() is None:
            results[key] = future.result()
        elif future in done and not future.cancelled():
            logger.debug("DHT lookup of %r failed: %r", key, future.exception())
    return results


def _decode_entries(key: str, found: object, with_expiration: bool = False) -> list[tuple]:
    """Decode hivemind's answer for one key: ValueWithExpiration({subkey: ValueWithExpiration(value)}), as
    [(peer_id, record)] or, `with_expiration`, [(peer_id, record, expiration_time)]."""
    if found is None:
        return []
    value = getattr(found, "value", None)
    if type(value) is not dict:
        logger.debug("dropping DHT key %r: not a dictionary value", key)
        return []
    items = {}
    for subkey, item in value.items():
        expiration = getattr(item, "expiration_time", None)
        if type(expiration) not in (float, int):
            logger.debug("dropping DHT entry under %r subkey %.60r: entry carries no expiration", key, subkey)
            continue
        items[subkey] = (item.value, expiration)
    return decode_dictionary(key, items, with_expiration)


def decode_dictionary(key: str, items: dict, with_expiration: bool = False) -> list[tuple]:
    """The valid records of one key's dictionary value {subkey: (unpacked value, expiration time)}, as
    [(peer_id, record)] or, `with_expiration`, [(peer_id, record, expiration_time)]. Expired entries, and
    entries that fail decode_entry or name another key, are dropped (logged at debug). Both transports
    end their reads here (hivemind's through _decode_entries, swarm.lite's directly)."""
    now = time.time()  # hivemind's get_dht_time
    entries = []
    for subkey, (value, expiration) in items.items():
        try:
            if expiration < now:
                continue
            peer_id, record = decode_entry(subkey, value)
            if record_key(record) != key:
                raise ProtocolError(f"{record.KIND} record names key {record_key(record)!r}")
        except ProtocolError as e:
            logger.debug("dropping DHT entry under %r subkey %.60r: %s", key, subkey, e)
            continue
        entries.append((peer_id, record, expiration) if with_expiration else (peer_id, record))
    return entries
