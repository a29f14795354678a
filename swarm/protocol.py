"""The wire protocol both sides agree on: handler names, framing, message schemas, tensor codec.

Transport: hivemind P2P binary streams, under explicitly named handlers whose name carries the major
version, or the same handlers over a peer's direct TLS streams (swarm.direct) where it announces them. Framing: each frame is a 4-byte big-endian header (top bit: "more frames of this message
follow", low 31 bits: payload length) and a payload; one message is one or more frames, so a payload
above hivemind's 4 MiB cap travels in parts. Payload: a msgpack map. Tensors travel as
{"dtype", "shape", "data"} with raw little-endian bytes (bfloat16 native). No pickle anywhere.

Every message from the network passes a strict decoder here before anything uses it; a failure raises
ProtocolError naming the field, which the peer answers with an error message.

Draining: a peer that is leaving refuses new sessions (error code ERROR_DRAINING, fatal), and every
"result" it sends while draining carries "drain_deadline" (float, unix time it leaves), as does its
"info"; older clients ignore the unknown field.

Admission: "open" may carry "wait_s" (seconds, 0 to 3600), how long the client will wait for KV room;
the peer waits the lesser of that and its own admission time, then refuses with ERROR_FULL (fatal; the
budget is committed to open sessions, so a later open may succeed). Older peers ignore the field.

Server-to-server steps: a "step" may carry "push", the rest of the route after this hop: a list of
{"peer", "session", "token", "step", "dtype"} (the next hops' peer ids, session ids, push tokens, the
step id that hop expects and its wire dtype). A peer dials the next one only at the addresses of that
peer's own DHT record for the next block, never at addresses a client names. After computing, the peer sends the
step on to push[0] over FORWARD_HANDLER (the same "step" message in push[0]'s dtype, plus "session"
and "token", with "push" = push[1:]) before replying to its client with "pushed": true. A push token
is `push_token(key, pusher, position)`: an HMAC, under the session's secret push key (from its "opened"
reply, known only to the client and that peer), of the peer id allowed to push and the step's
position; the receiving peer checks it against the pushing stream's authenticated peer id, so a token
is good for one pusher and one position only. The next peer runs a forwarded step exactly as if its
client had sent it and replies to its own client. A client whose previous hop was asked to push but
reported "pushed": false, or whose forwarded step has not come back in time, sends the step itself
with "fallback": true; a peer drops such a step when the forwarded copy of it has already run, and
drops a forwarded step whose position its session has passed. Results carry "step" and "position"
(after the step), which the client checks.

Batches (minor 2): "opened" carries the peer's "minor", and a client passes it on as the push
target's "minor". A pusher sends steps to a target of minor >= 2 batched: {"type": "steps", "minor",
"steps": [step messages as above]}, the decode steps of one forward bound for one peer in one
message (up to 1 MiB of hidden states; a bigger cohort takes several); each step in it is checked
and taken or dropped exactly as if it had come alone. Steps whose hidden states exceed 64 KiB
(prompts) still travel alone, on a stream of their own.

Rollback (minor 3): {"type": "rollback", "minor", "position": N} on an inference stream takes the
session back to holding its first N positions (speculative decoding drops the rejected draft tokens; a
client may rewind a step it does not trust). N must lie in [0, the session's position]; anything else
gets a non-fatal ERROR_PROTOCOL reply naming the session's position, and the session is unchanged.
Success is answered {"type": "rolled_back", "position": N} (plus "drain_deadline" while draining), in
order with the results, so a client may send a rollback and the next step back to back and read both
replies after. The peer forgets every cache slot from N on and the bookkeeping of forwarded steps past
it (a fallback copy at a rolled-back position is a new step, not a duplicate). A step pushed by the
previous peer that arrives before its hop's rollback is at a position the session has passed, and is
dropped like any stale copy; the client then sends it itself after its forward wait (slower, never wrong).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import struct
from typing import Any

import msgpack
import numpy as np
import torch

from swarm.errors import ProtocolError

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 3  # 1: server-to-server steps (push / forward); 2: forwarded steps travel in batches;
# 3: "rollback" of a session to an earlier position
BATCH_MINOR = 2  # a peer that said this minor (or later) in "opened" takes {"type": "steps"} batches
INFERENCE_HANDLER = f"/swarm/v{PROTOCOL_MAJOR}/inference"
INFO_HANDLER = f"/swarm/v{PROTOCOL_MAJOR}/info"
FORWARD_HANDLER = f"/swarm/v{PROTOCOL_MAJOR}/forward"  # peer to peer: steps pushed along the route

# codes of {"type": "error"} replies
ERROR_PROTOCOL = "protocol"  # the request failed the strict decoder; fix the sender
ERROR_REFUSED = "refused"  # refused on purpose (limits, blocks not served); this peer will refuse it again
ERROR_DRAINING = "draining"  # the peer is leaving soon and takes no new sessions; go to another peer
ERROR_FULL = "full"  # no KV room now (committed to open sessions) within the open's wait; later there may be

FRAME_BYTES = 1 << 20  # parts of at most 1 MiB, well below hivemind's 4 MiB message cap
_MORE = 1 << 31
_HEADER = 4

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
_ITEMSIZE = {name: dtype.itemsize for name, dtype in WIRE_DTYPES.items()}


# ---------------------------------------------------------------- framing


async def write_message(writer: asyncio.StreamWriter, message: dict) -> None:
    """Serialize and send one message, split into frames of at most FRAME_BYTES."""
    write_frames(writer, message)
    await writer.drain()


def write_frames(writer: asyncio.StreamWriter, message: dict) -> None:
    """`write_message` without waiting for the transport's buffer to drain (the caller drains later)."""
    payload = msgpack.packb(message, use_bin_type=True)
    view = memoryview(payload)
    offsets = range(0, max(len(view), 1), FRAME_BYTES)
    for offset in offsets:
        part = view[offset : offset + FRAME_BYTES]
        more = _MORE if offset + FRAME_BYTES < len(view) else 0
        # one write per frame: over TLS every write is a record of its own (and a pass through asyncio's
        # SSL layer), so the header goes with its payload
        writer.write((len(part) | more).to_bytes(_HEADER, "big") + part)


async def read_message(reader: asyncio.StreamReader, max_bytes: int) -> dict:
    """Read one message; refuse it (ProtocolError) as soon as it exceeds `max_bytes`, before buffering it.

    Headers count toward `max_bytes`, so an endless run of empty "more" frames is refused too.
    Raises asyncio.IncompleteReadError when the stream closes at a message boundary or mid-message.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        header = int.from_bytes(await reader.readexactly(_HEADER), "big")
        length, more = header & ~_MORE, bool(header & _MORE)
        total += _HEADER + length
        if total > max_bytes:
            raise ProtocolError(f"message exceeds the limit of {max_bytes} bytes")
        chunks.append(await reader.readexactly(length))
        if not more:
            break
    try:
        message = msgpack.unpackb(b"".join(chunks), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(f"message is not valid msgpack: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a msgpack map")
    return message


# ---------------------------------------------------------------- tensors


def pack_tensor(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"dtype {tensor.dtype} cannot travel on the wire")
    raw = tensor.view(torch.uint8) if tensor.numel() and tensor.dtype != torch.bool else tensor
    data = raw.numpy().tobytes() if tensor.numel() else b""
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data": data}


def unpack_tensor(obj: Any, field: str, *, dtypes: set[str] | None = None, rank: int | None = None) -> torch.Tensor:
    """Strictly decode a tensor field: known dtype, int shape, exact byte length."""
    obj = require(obj, dict, field)
    dtype_name = require(obj.get("dtype"), str, f"{field}.dtype")
    if dtype_name not in WIRE_DTYPES or (dtypes is not None and dtype_name not in dtypes):
        allowed = sorted(dtypes if dtypes is not None else WIRE_DTYPES)
        raise ProtocolError(f"{field}: dtype {dtype_name!r} not accepted here (accepted: {', '.join(allowed)})")
    shape = require(obj.get("shape"), list, f"{field}.shape")
    if rank is not None and len(shape) != rank:
        raise ProtocolError(f"{field}: expected rank {rank}, got shape {shape}")
    if not all(type(d) is int and 0 <= d < 2**31 for d in shape):
        raise ProtocolError(f"{field}: shape must be non-negative integers, got {shape}")
    data = require(obj.get("data"), bytes, f"{field}.data")
    dtype = WIRE_DTYPES[dtype_name]
    expected = math.prod(shape) * _ITEMSIZE[dtype_name]
    if len(data) != expected:
        raise ProtocolError(f"{field}: {len(data)} bytes do not match shape {shape} of {dtype_name} ({expected})")
    if dtype_name == "bool" and data.translate(None, b"\x00\x01"):  # torch leaves other bytes undefined
        raise ProtocolError(f"{field}: bool values must be the bytes 0 or 1")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


# exponent bits of each float wire dtype (little-endian words): a value is NaN or infinite iff all are set
_EXPONENT_BITS = {"bfloat16": ("<u2", 0x7F80), "float16": ("<u2", 0x7C00), "float32": ("<u4", 0x7F800000)}


def all_finite(obj: dict) -> bool:
    """Whether a tensor field that `unpack_tensor` accepted holds no NaN or infinity, read from its raw
    bytes with numpy: a few microseconds for a decode step's hidden state, against ~20 for torch.isfinite
    on a CPU tensor, and no torch call (each one a GIL hand-off) on the peer's event loop. Integer and bool
    fields are always finite."""
    kind = _EXPONENT_BITS.get(obj["dtype"])
    if kind is None or not obj["data"]:
        return True
    words, mask = kind
    return int(np.bitwise_and(np.frombuffer(obj["data"], words), mask).max()) != mask


def int_range(obj: dict) -> tuple[int, int] | None:
    """(min, max) of an int64 tensor field that `unpack_tensor` accepted, from its bytes; None if empty."""
    data = obj["data"]
    if not data:
        return None
    if len(data) <= 64:  # a decode step's few positions: plain Python beats a numpy reduction's overhead
        values = struct.unpack(f"<{len(data) // 8}q", data)
        return min(values), max(values)
    values = np.frombuffer(data, "<i8")
    return int(values.min()), int(values.max())


# ---------------------------------------------------------------- field helpers


def require(value: Any, kind: type, field: str) -> Any:
    """Type check with no conversions (bool is not int)."""
    if kind is int:
        ok = type(value) is int
    elif kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ProtocolError(f"field {field!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def require_int(value: Any, field: str, lo: int, hi: int) -> int:
    value = require(value, int, field)
    if not lo <= value <= hi:
        raise ProtocolError(f"field {field!r}: {value} is outside [{lo}, {hi}]")
    return value


def check_minor(message: dict) -> None:
    minor = require(message.get("minor", 0), int, "minor")
    if minor < 0:
        raise ProtocolError(f"field 'minor': {minor} is no version (this peer speaks 0..{PROTOCOL_MINOR})")
    if minor > PROTOCOL_MINOR:
        raise ProtocolError(
            f"protocol v{PROTOCOL_MAJOR}.{minor} is newer than this peer's v{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; "
            "upgrade the peer or use an older client"
        )


def push_token(key: str, pusher: str, position: int) -> str:
    """What lets peer `pusher` push the step at `position` into the session whose push key is `key`."""
    return hmac.new(key.encode(), f"{pusher}/{position}".encode(), hashlib.sha256).hexdigest()[:32]


def error_message(code: str, text: str, *, fatal: bool = False) -> dict:
    return {"type": "error", "code": code, "message": text, "fatal": fatal}
