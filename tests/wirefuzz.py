"""Wire fuzzing of real peers: seeded mutations of valid swarm messages, over p2pd and the direct TLS port.

Shared by tests/test_wire_fuzz.py (a short campaign beside a healthy session) and benchmarks/fuzz_wire.py
(a long one), and by tests/test_message_fields.py for its raw streams (`Wire`, `Target`).

A case starts from a valid message of what a peer accepts (an inference stream's open, step and close,
a forwarded step alone or in a "steps" batch, an info request, a direct stream's hello) and mutates it:
fields dropped, values swapped for other types or pushed to edge values, unknown fields added, bits
flipped in the msgpack encoding and in tensor bytes, tensors reshaped or given NaN, frames truncated,
split, oversized or given broken headers, random garbage instead of a message, valid messages in the
wrong order. It is sent either as the first message of a fresh stream ("open") or on a stream already in
use ("session"), over p2pd or the peer's direct TLS port, and its outcome is read off the wire:

    error_reply    the peer answered with an error (fatal or not)
    closed_stream  the peer closed the stream (a valid "close", a forwarded step whose claims are broken,
                   garbage before TLS)
    served         the message was still valid and got its normal answer (or, forwarded, ran)
    forward_dropped a forwarded step the peer took off the stream and counted (rejected, dropped,
                   duplicate, overflow: info's "forward" figures); forwarded steps get no reply by design
    silence        none of those within REPLY_TIMEOUT_S: a bug
    peer_death     a peer stopped answering `info` (checked all along): a bug

A truncated frame leaves the peer waiting, rightly, for the bytes its header announced; `peer_reads`
replays the peer's framing on what a case sends, and the case sends zeros after it until the peer has
whole messages, so that waiting is never mistaken for silence (and the number of answers to expect is
known). Each worker draws its cases from its own `random.Random(f"{seed}/{worker}")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import random
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from client.transport import HivemindTransport
from swarm.direct import HELLO_BYTES, _signed_text, tcp_endpoint
from swarm.errors import PeerError
from swarm.identity import Identity
from swarm.protocol import (
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_MINOR,
    WIRE_DTYPES,
    pack_tensor,
    push_token,
    read_message,
)

INFO_TRIES = 3  # streams an `info` gets before its peer counts as dead
REPLY_TIMEOUT_S = 10.0  # generous on 2 shared cores; only a silent case ever waits this long
OPEN_LIMIT = 64 * 1024  # the peer reads an open or an info request within min(this, max_message_bytes)
HANDLERS = {"inference": INFERENCE_HANDLER, "info": INFO_HANDLER, "forward": FORWARD_HANDLER}
FAKE_PEER = "0OIl-not-base58"  # a push target no peer dials (not base58): the push fails at once
OUTCOMES = ("error_reply", "closed_stream", "served", "forward_dropped", "silence", "peer_death")
_MORE = 1 << 31


# ---------------------------------------------------------------- peers and the raw client


@dataclass(frozen=True)
class Target:
    """What the fuzzer needs to know of one peer: where it is and what it serves."""

    peer_id: str
    addrs: tuple[str, ...]
    direct: str | None  # its direct TLS address, if any
    model_id: str
    span: tuple[int, int]
    hidden_size: int
    dtype: str
    max_message_bytes: int
    max_session_length: int

    @classmethod
    def of(cls, server) -> Target:
        c = server.config
        return cls(server.peer_id, tuple(server.addrs), (server.direct_addrs or [None])[0], server.model_id,
                   (server.span.start, server.span.end), server.model_config.hidden_size,
                   {v: k for k, v in WIRE_DTYPES.items()}[server.dtype], c.max_message_bytes,
                   c.max_session_length_tokens)


class Wire:
    """A raw client with its own p2pd on its own event loop thread: streams to a peer's handlers over p2pd
    (it never learns the direct addresses, so `HivemindTransport` keeps to p2pd) or its direct TLS port."""

    def __init__(self, initial_peers: list[str]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wire-fuzz", daemon=True)
        self.thread.start()
        self.transport: HivemindTransport = self.run(HivemindTransport.create(initial_peers))
        self.peer_id = self.transport.p2p.peer_id.to_base58()
        self.hello_identity = Identity.load_or_create(None)  # signs hand-made hellos (any RSA key may dial)

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.run(self.transport.shutdown(), timeout_s=20)
        finally:
            self.hello_identity.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    async def open(self, target: Target, handler: str, path: str):
        """(reader, writer) of a stream to `handler` ("inference", "info", "forward") over `path`."""
        name = HANDLERS[handler]
        if path == "direct":
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                return await self.transport.dialer.open(target.peer_id, target.direct, name)
        return await self.transport.open_stream(target.peer_id, target.addrs, name, REPLY_TIMEOUT_S)

    async def info(self, target: Target, path: str = "p2pd") -> dict:
        reader, writer = await self.open(target, "info", path)
        try:
            writer.write(frame(msgpack.packb({"type": "info", "minor": PROTOCOL_MINOR})))
            return await asyncio.wait_for(read_message(reader, 1 << 20), REPLY_TIMEOUT_S)
        finally:
            writer.close()

    async def info_answered(self, target: Target, path: str = "p2pd", report: Report | None = None) -> dict:
        """`info`, asked again on a fresh stream (up to INFO_TRIES, a pause between) when a stream fails
        without an answer: a peer that answers on a retry is alive. Each failed stream is noted in
        `report.info_failures` (the test bounds them); the last failure is raised."""
        for attempt in range(INFO_TRIES):
            try:
                return await self.info(target, path)
            except (asyncio.IncompleteReadError, ConnectionError, PeerError) as e:
                if report is not None:
                    report.info_failures.append(f"{target.peer_id[-6:]} over {path}: {e!r}")
                if attempt == INFO_TRIES - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def tls(self, target: Target):
        """A TLS connection to the direct port, before the peer's challenge is read (a hand-made handshake)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return await asyncio.wait_for(asyncio.open_connection(*tcp_endpoint(target.direct), ssl=context),
                                      REPLY_TIMEOUT_S)

    def hello(self, target: Target, handler: str, nonce: bytes) -> dict:
        key = self.hello_identity.private_key
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        signature = key.sign(_signed_text(target.peer_id, handler, nonce), padding.PKCS1v15(), hashes.SHA256())
        return {"type": "hello", "handler": handler, "key": der, "signature": signature}


# ---------------------------------------------------------------- framing, as the peer reads it


def frame(payload: bytes, more: bool = False) -> bytes:
    return (len(payload) | (_MORE if more else 0)).to_bytes(4, "big") + payload


@dataclass
class Reads:
    payloads: list[bytes]  # the whole messages the peer reads, in order
    refused: bool  # after those, a header takes the message past the peer's limit: it answers that, fatally
    filler: bytes  # zeros to send after the data, so that the peer's last read ends (b"" if it does)


def peer_reads(data: bytes, first_limit: int, limit: int) -> Reads:
    """Replay swarm.protocol.read_message on `data`: 4-byte headers (top bit: more frames follow), each
    message held to its limit (headers counted) from its first header on."""
    buf, filler = bytearray(data), bytearray()
    pos, payloads = 0, []

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            pad = b"\0" * (pos + n - len(buf))
            buf.extend(pad)
            filler.extend(pad)
        pos += n
        return bytes(buf[pos - n : pos])

    while pos < len(buf):
        cap = first_limit if not payloads else limit
        total, chunks = 0, []
        while True:
            header = int.from_bytes(take(4), "big")
            length = header & ~_MORE
            total += 4 + length
            if total > cap:
                return Reads(payloads, True, bytes(filler))
            chunks.append(take(length))
            if not header & _MORE:
                break
        payloads.append(b"".join(chunks))
    return Reads(payloads, False, bytes(filler))


def decoded(payload: bytes) -> Any:
    """The message the peer decodes from `payload`, or None where it refuses it (not msgpack, not a map)."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError):
        return None
    return message if isinstance(message, dict) else None


# ---------------------------------------------------------------- valid messages


def open_message(target: Target, batch: int = 1, max_length: int = 64) -> dict:
    return {"type": "open", "minor": PROTOCOL_MINOR, "model_id": target.model_id, "blocks": list(target.span),
            "batch_size": batch, "max_length": max_length}


def step_message(target: Target, position: int, rows: int = 1, tokens: int = 1, *, step: int = 0,
                 rng: random.Random | None = None, pad: int = 0) -> dict:
    """A valid step of `tokens` new tokens for `rows` rows at `position`; `pad`: left padding of row 0."""
    generator = torch.Generator().manual_seed((rng or random.Random(0)).getrandbits(32))
    hidden = torch.randn(rows, tokens, target.hidden_size, generator=generator).to(WIRE_DTYPES[target.dtype])
    valid = torch.ones(rows, tokens, dtype=torch.bool)
    valid[0, :pad] = False
    ids = torch.arange(position, position + tokens).repeat(rows, 1)
    return {"type": "step", "minor": PROTOCOL_MINOR, "step": step, "position": position,
            "hidden": pack_tensor(hidden), "position_ids": pack_tensor(ids), "valid": pack_tensor(valid)}


def push_hop(rng: random.Random) -> dict:
    return {"peer": FAKE_PEER, "session": rng.randrange(1 << 20), "token": "%032x" % rng.getrandbits(128),
            "step": 0, "dtype": "float32", "minor": PROTOCOL_MINOR}


def info_message() -> dict:
    return {"type": "info", "minor": PROTOCOL_MINOR}


# ---------------------------------------------------------------- mutations

_SWAPS = [None, True, False, 0, 7, -1, 1.5, float("nan"), "x", "7", b"\x07", [], [7], {}, {"k": 7}]
_WORDS = ["", "open", "step", "steps", "close", "info", "hello", "frobnicate", "float64", "float32", "bfloat16",
          "float16", "int64", "int32", "bool", "uint8", "é" * 32, "0" * 32, "x" * 129]


def _swap_value(rng: random.Random, unlike: type | None = None):
    """A fresh copy of a value of another msgpack type (the pool's lists and maps must never be shared)."""
    return copy.deepcopy(rng.choice([v for v in _SWAPS if unlike is None or _kind(v) is not unlike]))


def _kind(value) -> type:
    return type(value) if value is not None else type(None)


def _paths(obj, path=()):
    """Every (container path, key) under `obj`: dict keys, and the items of short lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*path, key)
            yield from _paths(value, (*path, key))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, value in enumerate(obj):
            yield (*path, i)
            yield from _paths(value, (*path, i))


def _parent(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    return obj


def _edge(value, rng: random.Random):
    if type(value) is bool:
        return not value
    if type(value) is int:
        return rng.choice([-1, 0, 1, value - 1, value + 1, value * 1000 + 7, 2**31 - 1, 2**31, 2**62 + 1,
                           2**63 - 1, -(2**63), 2**64 - 1])
    if isinstance(value, float):
        return rng.choice([float("nan"), float("inf"), -float("inf"), -0.0])
    if isinstance(value, str):
        return rng.choice([*_WORDS, value[:-1], value + value[-1:], value.upper()])
    if isinstance(value, bytes):
        return rng.choice([b"", value[:-1], value + b"\0", value[: len(value) // 2], rng.randbytes(len(value))])
    if isinstance(value, list):
        return rng.choice([[], value[:-1], value + value[-1:], value * 2, [None], [*value, "x"]])
    if isinstance(value, dict):
        return rng.choice([{}, {"dtype": "float32"}, [value]])
    return _swap_value(rng)


def _tensors(message) -> list[dict]:
    """The tensor fields in `message` ({"dtype", "shape", "data"}), nested ones included."""
    found = []
    for path in _paths(message):
        value = _parent(message, path)[path[-1]]
        if isinstance(value, dict) and isinstance(value.get("data"), bytes) and "shape" in value:
            found.append(value)
    return found


_NONFINITE = {"float32": [struct.pack("<f", v) for v in (math.nan, math.inf, -math.inf)],
              "bfloat16": [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"], "float16": [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"]}
_ITEMSIZE = {name: dtype.itemsize for name, dtype in WIRE_DTYPES.items()}


def _mutate_tensor(t: dict, rng: random.Random) -> str:
    data = bytearray(t["data"])
    op = rng.choice(["bits", "bits", "nonfinite", "reshape", "dtype", "shape_junk"])
    if op == "bits" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        t["data"] = bytes(data)
    elif op == "nonfinite" and t["dtype"] in _NONFINITE and data:
        size = _ITEMSIZE[t["dtype"]]
        at = rng.randrange(len(data) // size) * size
        data[at : at + size] = rng.choice(_NONFINITE[t["dtype"]])
        t["data"] = bytes(data)
    elif op == "reshape" and isinstance(t["shape"], list) and t["shape"]:
        shape = list(t["shape"])
        i = rng.randrange(len(shape))
        shape[i] = max(0, rng.choice([shape[i] + 1, shape[i] - 1, 0, shape[i] * 2, shape[i] + 64]))
        if rng.random() < 0.3:
            shape = rng.choice([shape[:-1], [*shape, 1], [1, *shape]])
        t["shape"] = shape
        size = math.prod(shape) * _ITEMSIZE.get(t["dtype"], 1)
        if size <= 1 << 15 and rng.random() < 0.7:  # bytes that fit the new shape: only its meaning is wrong
            t["data"] = bytes(rng.getrandbits(1) for _ in range(size)) if t["dtype"] == "bool" else rng.randbytes(size)
    elif op == "dtype":
        t["dtype"] = rng.choice([*WIRE_DTYPES, "float64", "uint8", "complex64", ""])
    else:
        t["shape"] = rng.choice([[-1], [2**31], [1.0], [True], ["1"], None, [1, 2**31 - 1, 2**31 - 1],
                                 [2**40, 2**40, 0]])
    return f"tensor_{op}"


def mutate(message: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """A copy of `message` with one to three mutations of its fields; their names. A mutation that the
    message, as earlier ones left it, cannot take (a tensor op on a tensor without its dtype, an int pushed
    past what msgpack encodes) is undone."""
    message = copy.deepcopy(message)
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        before = copy.deepcopy(message)
        try:
            name = _mutate_once(message, rng)
            msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, KeyError, OverflowError):
            message = before
            continue
        names.append(name)
    return message, names


def _mutate_once(message: dict, rng: random.Random) -> str:
    paths = list(_paths(message))
    op = rng.choice(["drop", "swap", "swap", "edge", "edge", "unknown", "tensor", "tensor"])
    if op == "tensor":
        if _tensors(message):
            return _mutate_tensor(rng.choice(_tensors(message)), rng)
        op = "edge"
    if op == "unknown" or not paths:
        holders = [message] + [v for p in paths if isinstance(v := _parent(message, p)[p[-1]], dict)]
        rng.choice(holders)[f"fuzz_{rng.randrange(100)}"] = _swap_value(rng)
        return "unknown_field"
    path = rng.choice(paths)
    holder, key = _parent(message, path), path[-1]
    if op == "drop":
        del holder[key]
    elif op == "swap":
        holder[key] = _swap_value(rng, _kind(holder[key]))
    else:
        holder[key] = _edge(holder[key], rng)
    return op


def encode(message: dict, rng: random.Random, limit: int, byte_ops: float = 0.35) -> tuple[bytes, list[str]]:
    """Frames of `message`: one, or several ("more" bits), sometimes damaged at the byte level."""
    payload = msgpack.packb(message, use_bin_type=True)
    names = []
    if rng.random() < byte_ops:
        op = rng.choice(["msgpack_bits", "msgpack_truncate", "msgpack_extend", "frame_truncate", "frame_header",
                         "oversized", "empty_frames", "garbage", "garbage_framed"])
        names.append(op)
        if op == "msgpack_bits":
            raw = bytearray(payload)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return frame(bytes(raw)), names
        if op == "msgpack_truncate":
            return frame(payload[: rng.randrange(len(payload))]), names
        if op == "msgpack_extend":
            return frame(payload + rng.randbytes(rng.randint(1, 16))), names
        if op == "frame_truncate":
            data = _split(payload, rng)
            return data[: rng.randrange(1, len(data))], names
        if op == "frame_header":
            data = bytearray(frame(payload))
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(4)] ^= 1 << rng.randrange(8)
            return bytes(data), names
        if op == "oversized":
            if rng.random() < 0.5:
                return (limit - 3 + rng.randrange(1 << 20)).to_bytes(4, "big"), names  # a header alone
            return frame(msgpack.packb({**message, "padding": rng.randbytes(limit)}, use_bin_type=True)), names
        if op == "empty_frames":
            return frame(b"", more=True) * rng.choice([1, 10, limit // 8, limit // 4 + 1]) + frame(payload), names
        garbage = rng.randbytes(rng.randint(1, 400))
        return (frame(garbage) if op == "garbage_framed" else garbage), names
    if rng.random() < 0.15:
        names.append("frame_split")
        return _split(payload, rng), names
    return frame(payload), names


def _split(payload: bytes, rng: random.Random) -> bytes:
    cuts = sorted(rng.sample(range(1, len(payload)), min(len(payload) - 1, rng.randint(1, 4)))) if len(payload) > 1 else []
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    return b"".join(frame(p, more=i < len(parts) - 1) for i, p in enumerate(parts))


# ---------------------------------------------------------------- reading outcomes


@dataclass
class Answer:
    replies: list[dict] = field(default_factory=list)
    ended: bool = False  # the peer closed the stream
    timed_out: bool = False

    @property
    def outcome(self) -> str:
        if any(r.get("type") == "error" for r in self.replies):
            return "error_reply"
        if self.timed_out:
            return "silence"
        return "closed_stream" if self.ended else "served"

    @property
    def fatal(self) -> bool:
        return self.ended or any(r.get("type") == "error" and r.get("fatal") for r in self.replies)


async def answers(reader, expected: int, timeout_s: float = REPLY_TIMEOUT_S) -> Answer:
    """Read replies until `expected` came, a fatal error came, or the stream ended; time out otherwise."""
    answer = Answer()
    try:
        async with asyncio.timeout(timeout_s):
            while len(answer.replies) < expected:
                reply = await read_message(reader, 1 << 22)
                answer.replies.append(reply)
                if reply.get("type") == "error" and reply.get("fatal"):
                    break
    except (asyncio.IncompleteReadError, ConnectionError):
        answer.ended = True
    except TimeoutError:
        answer.timed_out = True
    return answer


async def until_closed(reader, timeout_s: float) -> bool:
    """Whether the peer closes the stream within `timeout_s` (whatever it sends before)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(1 << 16):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


# ---------------------------------------------------------------- the campaign


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)
    by_worker: dict = field(default_factory=dict)  # worker -> Counter of outcomes
    by_mutation: Counter = field(default_factory=Counter)
    silences: list = field(default_factory=list)  # what reproduces each silent case
    deaths: list = field(default_factory=list)
    info_failures: list = field(default_factory=list)  # info streams that ended unanswered, then retried
    messages: int = 0  # cases sent (a case is one message, or a few in one write)
    info_checks: int = 0

    def add(self, worker: str, outcome: str, names: list[str], repro: dict) -> None:
        self.messages += 1
        self.outcomes[outcome] += 1
        self.by_worker.setdefault(worker, Counter())[outcome] += 1
        for name in names or ["valid"]:
            self.by_mutation[name] += 1
        if outcome == "silence":
            self.silences.append(repro)

    def as_dict(self) -> dict:
        return {
            "messages": self.messages, "outcomes": {k: self.outcomes.get(k, 0) for k in OUTCOMES},
            "by_worker": {w: dict(c) for w, c in sorted(self.by_worker.items())},
            "by_mutation": dict(self.by_mutation.most_common()), "info_checks": self.info_checks,
            "info_failures": self.info_failures[:10], "silences": self.silences[:10], "deaths": self.deaths[:10],
        }


class _Worker:
    def __init__(self, name: str, wire: Wire, seed: int, report: Report):
        self.name, self.wire, self.report = name, wire, report
        self.rng = random.Random(f"{seed}/{name}")
        self.index = 0

    def record(self, outcome: str, names: list[str], data: bytes, **extra) -> None:
        repro = {"worker": self.name, "case": self.index, "mutations": names, "bytes": data[:96].hex(), **extra}
        self.report.add(self.name, outcome, names, repro)
        self.index += 1


class SessionWorker(_Worker):
    """Mutated messages on one open inference session (reopened when the peer ends it)."""

    def __init__(self, name, wire, seed, report, target: Target, path: str):
        super().__init__(name, wire, seed, report)
        self.target, self.path = target, path
        self.stream = None
        self.position = self.rows = 0
        self.max_length = 64

    async def _open(self) -> None:
        self.rows = self.rng.choice([1, 1, 2])
        reader, writer = await self.wire.open(self.target, "inference", self.path)
        writer.write(frame(msgpack.packb(open_message(self.target, self.rows, self.max_length))))
        answer = await answers(reader, 1)
        if answer.outcome != "served" or answer.replies[0].get("type") != "opened":
            writer.close()
            raise AssertionError(f"{self.name}: a valid open was not served: {answer}")
        self.stream, self.position = (reader, writer), 0

    def _close(self) -> None:
        if self.stream is not None:
            self.stream[1].close()
        self.stream = None

    def _base(self) -> dict:
        rng = self.rng
        roll = rng.random()
        if roll < 0.03:
            return {"type": "close", "minor": PROTOCOL_MINOR}
        if roll < 0.09:  # a valid message of another kind, or of another time (wrong order)
            return rng.choice([open_message(self.target), info_message(), {"type": "steps", "steps": []},
                               step_message(self.target, max(0, self.position - 1), self.rows, rng=rng),
                               step_message(self.target, self.position + 1, self.rows, rng=rng),
                               {"type": "hello", "handler": INFERENCE_HANDLER}])
        tokens = rng.choice([1, 1, 1, 2, 3, 5])
        message = step_message(self.target, self.position, self.rows, tokens, step=rng.randrange(100), rng=rng,
                               pad=rng.choice([0, 0, 0, 1]) if tokens > 1 else 0)
        if rng.random() < 0.2:
            message["push"] = [push_hop(rng)]
        if rng.random() < 0.1:
            message["fallback"] = rng.random() < 0.5
        return message

    async def case(self) -> None:
        if self.stream is None or self.position > self.max_length - 8:
            self._close()
            await self._open()
        base = self._base()
        message, names = mutate(base, self.rng) if self.rng.random() < 0.8 else (base, [])
        data, byte_names = encode(message, self.rng, self.target.max_message_bytes)
        names += byte_names
        reads = peer_reads(data, self.target.max_message_bytes, self.target.max_message_bytes)
        reader, writer = self.stream
        try:
            writer.write(data + reads.filler)
            await writer.drain()
        except ConnectionError:
            pass  # the peer ended the stream already: the answer says so
        answer = await answers(reader, len(reads.payloads) + reads.refused)
        for reply in answer.replies:
            if reply.get("type") == "result" and type(reply.get("position")) is int:
                self.position = reply["position"]
        self.record(answer.outcome, names, data)
        if answer.fatal or answer.timed_out:
            self._close()


class OpenWorker(_Worker):
    """Mutated first messages of fresh streams: inference opens, info requests, direct hellos, and bytes
    before TLS on the direct port."""

    def __init__(self, name, wire, seed, report, targets: list[Target]):
        super().__init__(name, wire, seed, report)
        self.targets = targets

    async def case(self) -> None:
        rng = self.rng
        target = rng.choice(self.targets)
        path = rng.choice(["p2pd", "direct"]) if target.direct else "p2pd"
        kind = rng.choice(["inference"] * 5 + ["info"] * 2 + (["hello", "hello", "tcp"] if path == "direct" else []))
        if kind == "tcp":
            return await self._before_tls(target)
        if kind == "hello":
            return await self._hello(target)
        if kind == "info":
            base, first_limit = info_message(), OPEN_LIMIT
        else:
            base = rng.choice([open_message(target, rng.choice([1, 2]), rng.choice([1, 16, 64])), open_message(target)])
            if rng.random() < 0.08:  # a valid message of another kind first
                base = rng.choice([step_message(target, 0, rng=rng), {"type": "close"}, info_message(),
                                   {"type": "steps", "steps": []}, {"type": "hello"}])
            first_limit = min(OPEN_LIMIT, target.max_message_bytes)
        message, names = mutate(base, rng) if rng.random() < 0.85 else (base, [])
        data, byte_names = encode(message, rng, first_limit)
        names = [f"{kind}:{n}" for n in names + byte_names]
        if kind == "inference" and rng.random() < 0.1:  # a second message behind the first
            data += frame(msgpack.packb(rng.choice([open_message(target), {"type": "close"},
                                                    step_message(target, 0, rng=rng)]), use_bin_type=True))
            names.append(f"{kind}:second_message")
        reads = peer_reads(data, first_limit, target.max_message_bytes)
        reader, writer = await self.wire.open(target, kind, path)
        try:
            writer.write(data + reads.filler)
            expected = len(reads.payloads) + reads.refused
            answer = await answers(reader, 1 if kind == "info" else expected)
        finally:
            writer.close()
        self.record(answer.outcome, names, data, target=target.peer_id[-6:], path=path)

    async def _hello(self, target: Target) -> None:
        reader, writer = await self.wire.tls(target)
        try:
            challenge = await asyncio.wait_for(read_message(reader, HELLO_BYTES), REPLY_TIMEOUT_S)
            handler = self.rng.choice([INFERENCE_HANDLER, INFO_HANDLER, FORWARD_HANDLER])
            base = self.wire.hello(target, handler, challenge["nonce"])
            message, names = mutate(base, self.rng) if self.rng.random() < 0.9 else (base, [])
            data, byte_names = encode(message, self.rng, HELLO_BYTES)
            names = [f"hello:{n}" for n in names + byte_names]
            reads = peer_reads(data, HELLO_BYTES, HELLO_BYTES)
            writer.write(data + reads.filler)
            answer = await answers(reader, 1)
        finally:
            writer.close()
        if answer.replies and answer.replies[0].get("type") == "welcome":
            answer.replies[0] = {"type": "welcome"}  # served: the stream went on to its handler
        self.record(answer.outcome, names, data, target=target.peer_id[-6:], path="direct")

    async def _before_tls(self, target: Target) -> None:
        reader, writer = await asyncio.open_connection(*tcp_endpoint(target.direct))
        data = self.rng.choice([self.rng.randbytes(self.rng.randint(1, 600)), b"\x16\x03\x01" + self.rng.randbytes(40),
                                frame(msgpack.packb(open_message(target)))])
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()  # a TLS record cut short leaves the handshake waiting for the rest
            closed = await until_closed(reader, REPLY_TIMEOUT_S)
        except ConnectionError:
            closed = True
        finally:
            writer.close()
        self.record("closed_stream" if closed else "silence", ["tcp:garbage"], data, target=target.peer_id[-6:])


FORWARD_COUNTERS = ("rejected", "dropped", "duplicates", "overflowed")


class ForwardWorker(_Worker):
    """Mutated forwarded steps (alone and in "steps" batches) to one peer, for a session of its own there
    (whose stream sees the results of the steps that run), on fresh forward streams and on streams in use.
    Forwarded steps get no reply: each must close the stream, run, or be counted in the peer's `info`."""

    def __init__(self, name, wire, seed, report, target: Target):
        super().__init__(name, wire, seed, report)
        self.target = target
        self.session = None  # (reader, writer, session id, push key)
        self.position = 0
        self.results = 0
        self.forward = None  # the forward stream in use
        self._reading: asyncio.Task | None = None

    async def _open_session(self) -> None:
        await self._close_session()
        reader, writer = await self.wire.open(self.target, "inference", self.rng.choice(["p2pd", "direct"]))
        writer.write(frame(msgpack.packb(open_message(self.target, 1, 64))))
        opened = (await answers(reader, 1)).replies[0]
        assert opened.get("type") == "opened", opened
        self.session, self.position = (reader, writer, opened["session"], opened["push_key"]), 0
        self._reading = asyncio.create_task(self._read_results(reader))

    async def _read_results(self, reader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                reply = await read_message(reader, 1 << 22)
                if reply.get("type") == "result":
                    self.results += 1
                    self.position = reply["position"]

    async def _close_session(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self.session is not None:
            self.session[1].close()
        self.session = self._reading = None

    async def close(self) -> None:
        await self._close_session()
        if self.forward is not None:
            self.forward[1].close()

    async def _counted(self) -> int:
        figures = (await self.wire.info_answered(self.target, report=self.report))["forward"]
        return sum(figures.get(k, 0) for k in FORWARD_COUNTERS) + self.results

    def _step(self, position: int) -> dict:
        _, _, session, key = self.session
        message = step_message(self.target, position, 1, self.rng.choice([1, 1, 2]), step=self.rng.randrange(9),
                               rng=self.rng)
        message.update(session=session, token=push_token(key, self.wire.peer_id, position), push=[])
        if self.rng.random() < 0.15:
            message["push"] = [push_hop(self.rng)]
        return message

    def _base(self) -> dict:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return {"type": "steps", "minor": PROTOCOL_MINOR,
                    "steps": [self._step(self.position) for _ in range(rng.choice([1, 2, 3, 10]))]}
        if roll < 0.42:  # of another time, or another kind
            return rng.choice([self._step(max(0, self.position - 1)), self._step(self.position + 1),
                               {**self._step(self.position), "type": "close"}, open_message(self.target),
                               info_message()])
        return self._step(self.position)

    async def case(self) -> None:
        rng = self.rng
        if self.session is None or self.position > 56:
            await self._open_session()
        if self.forward is None or rng.random() < 0.2:  # a fresh stream: the case is its first message
            if self.forward is not None:
                self.forward[1].close()
            self.forward = await self.wire.open(self.target, "forward", rng.choice(["p2pd", "direct"]))
        base = self._base()
        message, names = mutate(base, rng) if rng.random() < 0.8 else (base, [])
        data, byte_names = encode(message, rng, self.target.max_message_bytes)
        names = [f"forward:{n}" for n in names + byte_names]
        reads = peer_reads(data, self.target.max_message_bytes, self.target.max_message_bytes)
        steps = [_forwarded_steps(decoded(p)) for p in reads.payloads]
        # whatever the peer cannot take as steps must end the stream; what it can must be accounted for
        must_close = reads.refused or any(n is None for n in steps)
        expected = sum(n for n in steps if n is not None)
        before = await self._counted()
        reader, writer = self.forward
        writer.write(data + reads.filler)
        outcome = await self._outcome(reader, before, expected, must_close)
        if outcome == "closed_stream" or outcome == "silence":
            writer.close()
            self.forward = None
        self.record(outcome, names, data, expected_steps=expected, must_close=must_close)

    async def _outcome(self, reader, before: int, expected: int, must_close: bool) -> str:
        closing = asyncio.ensure_future(until_closed(reader, REPLY_TIMEOUT_S))
        try:
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            ran_before = self.results
            while time.monotonic() < deadline:
                if closing.done():
                    return "closed_stream" if closing.result() else "silence"
                if not must_close and await self._counted() - before >= expected:
                    return "served" if self.results > ran_before else "forward_dropped"
                await asyncio.sleep(0.005)
            return "silence"
        finally:
            closing.cancel()


def _forwarded_steps(message) -> int | None:
    """How many forwarded steps the peer takes from `message` (each then runs or is counted), or None where
    it must end the stream instead: not a map, a batch without a list of maps, claims of the wrong types."""
    if message is None:
        return None
    if message.get("type") == "steps":
        minor = message.get("minor", 0)
        if type(minor) is not int or not 0 <= minor <= PROTOCOL_MINOR:
            return None
        steps = message.get("steps")
        if not isinstance(steps, list):
            return None
    else:
        steps = [message]
    for step in steps:
        if not isinstance(step, dict) or type(step.get("session")) is not int or type(
                step.get("position")) is not int or not isinstance(step.get("token"), str):
            return None
    return len(steps)


async def _monitor(wire: Wire, targets: list[Target], report: Report, stop: asyncio.Event) -> None:
    """`info` of every peer over each path, every half second: a peer that stops answering died."""
    while not stop.is_set():
        for target in targets:
            for path in ("p2pd", "direct") if target.direct else ("p2pd",):
                try:
                    info = await wire.info_answered(target, path, report)
                    assert info.get("type") == "info", info
                    report.info_checks += 1
                except Exception as e:  # any failure to answer counts
                    report.deaths.append(f"{target.peer_id[-6:]} over {path}: {e!r}")
                    report.outcomes["peer_death"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def campaign(wire: Wire, targets: list[Target], count: int, seed: int) -> Report:
    """About `count` cases over every target and path: sessions, fresh streams, forwarded steps (to the
    first target, whose forward figures nothing else moves: the healthy route pushes to the others)."""
    report = Report()
    workers: list[tuple[_Worker, int]] = []
    sessions = [(t, p) for t in targets for p in (("p2pd", "direct") if t.direct else ("p2pd",))]
    for target, path in sessions:
        workers.append((SessionWorker(f"session/{target.span[0]}:{target.span[1]}/{path}", wire, seed, report,
                                      target, path), int(count * 0.5 / len(sessions))))
    for i in range(2):
        workers.append((OpenWorker(f"open/{i}", wire, seed, report, targets), int(count * 0.15)))
    forward = ForwardWorker("forward", wire, seed, report, targets[0])
    workers.append((forward, count - sum(n for _, n in workers)))
    stop = asyncio.Event()
    monitor = asyncio.create_task(_monitor(wire, targets, report, stop))

    async def drive(worker: _Worker, cases: int) -> None:
        for _ in range(cases):
            await worker.case()

    try:
        await asyncio.gather(*(drive(w, n) for w, n in workers))
    finally:
        stop.set()
        await monitor
        await forward.close()
        for worker, _ in workers:
            if isinstance(worker, SessionWorker):
                worker._close()
    return report


# ---------------------------------------------------------------- beside it: a healthy session, and the logs


class Healthy:
    """Greedy generations in a loop on a thread of its own, each compared with the local reference; a route
    change (recovery) counts as harm too."""

    def __init__(self, model, prompt: torch.Tensor, expected: torch.Tensor):
        self.model, self.prompt, self.expected = model, prompt, expected
        self.generations = self.mismatches = self.recoveries = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="healthy", daemon=True)

    def _loop(self) -> None:
        new = self.expected.shape[1] - self.prompt.shape[1]
        while not self._stop.is_set():
            try:
                with self.model.inference_session(max_length=self.expected.shape[1]) as session:
                    out = self.model.generate(self.prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
                    self.recoveries += session.recoveries
            except Exception as e:  # reported, and fails the campaign
                self.errors.append(repr(e))
                continue
            self.generations += 1
            self.mismatches += not torch.equal(out, self.expected)

    def __enter__(self) -> Healthy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def as_dict(self) -> dict:
        return {"generations": self.generations, "mismatches": self.mismatches, "recoveries": self.recoveries,
                "errors": self.errors[:5]}


class PeerErrors(logging.Handler):
    """Collects ERROR records of the peer's and the shared code's loggers (a handler that crashed, a forward
    that failed) while installed: a fuzzed message must never get that far."""

    PREFIXES = ("peer", "swarm", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Task was destroyed but it is pending") and "hivemind/" in message:
            return  # the garbage collector finishing a DHT node of an earlier test's closed loop, not this peer
        if record.name.split(".")[0] in self.PREFIXES:
            self.records.append(f"{record.name}: {message}"[:300])

    def __enter__(self) -> PeerErrors:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
