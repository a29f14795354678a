"""Every field of every message a peer accepts, driven through missing / wrong type / out of range.

Tier 3 (fault scenarios): one in-process peer (real p2pd, DHT and direct TLS port) serving all six blocks
of a tiny llama, and a raw client (tests/wirefuzz.py's `Wire`) on both paths. The cases are made from the
valid messages themselves: every key path of each one (list items, and each tensor's dtype, shape and data)
is dropped, given values of other msgpack types, and pushed out of range (for tensors: wrong rank, rows,
tokens, sizes, dtypes, byte counts, NaN and infinity, integers and bools out of range). Where a field is
optional or answered in a way of its own the expectation is written down below; every other field gets its
family's default answer, so a field added to a message later is driven too (and fails here until its
answer is decided):

    open, info, hello      first message of a stream, and the direct port's handshake: a fatal error reply
                           naming the field (the stream then ends)
    step, rollback, close  on an open session: a non-fatal error naming the field, the session unchanged
                           and still serving (the next case runs on it); a valid "close" ends the stream
    forward, batch         a forwarded step alone or in a "steps" batch: no reply, by design. A step whose
                           claims (session, token, position) are not of their types, or a batch that is no
                           batch, ends the stream; every other step is counted in info's "forward" figures
                           (rejected, dropped, duplicates, overflowed), or runs (received: its result comes
                           on the session's own stream)

Each case also runs as is ("valid"), so a template that stopped being served shows. After the cases the
peer answers info over both paths, holds no session and has logged no error.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from wirefuzz import (
    FAKE_PEER,
    REPLY_TIMEOUT_S,
    PeerErrors,
    Target,
    Wire,
    answers,
    frame,
    info_message,
    open_message,
    step_message,
    until_closed,
)

from peer.server import FORWARD_BACKLOG
from swarm.direct import HELLO_BYTES, _signed_text
from swarm.protocol import (
    ERROR_PROTOCOL,
    ERROR_REFUSED,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    WIRE_DTYPES,
    push_token,
    read_message,
)

MODEL_ID = "message-fields-llama"
SPAN = "0:6"
SESSION_LENGTH = 32  # the declared length of the raw client's sessions (reopened before they fill)
MAX_TOKENS = 64  # max_tokens_per_step: above SESSION_LENGTH, so a step past the length is its own case
MAX_BATCH = 4
MAX_LENGTH = 512
PEER_LIMITS = dict(max_message_bytes=256 * 1024, max_tokens_per_step=MAX_TOKENS, max_batch_size=MAX_BATCH,
                   max_session_length_tokens=MAX_LENGTH)
PATHS = ("p2pd", "direct")
FIGURES = ("received", "rejected", "dropped", "duplicates", "overflowed")  # info's "forward", as compared


# ---------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expect:
    answer: str  # "error", "served", "closed", "counted" (forward figures move), "noop" (the stream goes on)
    names: tuple[str, ...] = ()  # what the error's message must contain (the field, as the peer names it)
    code: str = ERROR_PROTOCOL
    counts: tuple[tuple[str, int], ...] = ()


def error(*names: str, code: str = ERROR_PROTOCOL) -> Expect:
    return Expect("error", names, code)


def refused(*names: str) -> Expect:
    return error(*names, code=ERROR_REFUSED)


def counted(**counts: int) -> Expect:
    return Expect("counted", counts=tuple(sorted(counts.items())))


SERVED, CLOSED, NOOP = Expect("served"), Expect("closed"), Expect("noop")
DROP = object()  # as a case's value: the field is removed


# ---------------------------------------------------------------- the valid messages


@dataclass
class Ctx:
    """What the valid messages of a case are made of: the peer, and the raw client's session there."""

    target: Target
    pusher: str = "pusher"  # the raw client's peer id: forwarded steps' tokens are made for it
    position: int = 0
    session: int = 1
    push_key: str = "0" * 32
    nonce: bytes = b""
    hello_key: Any = None  # the RSA key that signs hellos


def _hop() -> dict:
    return {"peer": FAKE_PEER, "session": 1, "token": "0" * 32, "step": 0, "dtype": "float32",
            "minor": PROTOCOL_MINOR}


def _der(key) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _sign(key, ctx: Ctx, handler: str, nonce: bytes | None = None) -> bytes:
    text = _signed_text(ctx.target.peer_id, handler, ctx.nonce if nonce is None else nonce)
    return key.sign(text, padding.PKCS1v15(), hashes.SHA256())


def template(family: str, ctx: Ctx) -> dict:
    """The valid message of `family`, as a client (or, forwarded, a pushing peer) sends it."""
    t = ctx.target
    if family == "open":
        return {**open_message(t, 1, SESSION_LENGTH), "wait_s": 5}
    if family == "info":
        return info_message()
    if family == "hello":
        key = ctx.hello_key
        return {"type": "hello", "handler": INFERENCE_HANDLER, "key": _der(key) if key else b"",
                "signature": _sign(key, ctx, INFERENCE_HANDLER) if key else b""}
    if family == "step":
        return {**step_message(t, ctx.position, step=7), "push": [_hop()], "fallback": False}
    if family == "rollback":
        return {"type": "rollback", "minor": PROTOCOL_MINOR, "position": ctx.position}
    if family == "close":
        return {"type": "close", "minor": PROTOCOL_MINOR}
    if family == "forward":  # what peer.forward.ForwardLink sends, a hop still ahead
        return {**step_message(t, ctx.position, step=7), "session": ctx.session,
                "token": push_token(ctx.push_key, ctx.pusher, ctx.position), "push": [_hop()]}
    if family == "batch":
        return {"type": "steps", "minor": PROTOCOL_MINOR, "steps": [template("forward", ctx)]}
    raise ValueError(family)


def _is_tensor(value) -> bool:
    return isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}


def walk(message, path=()):
    """(path, value) of every field under `message`: map keys and list items; a tensor's dtype, shape and
    data, but not the items of its shape (the tensor cases reshape it whole)."""
    items = message.items() if isinstance(message, dict) else enumerate(message)
    for key, value in items:
        here = (*path, key)
        yield here, value
        if _is_tensor(value):
            for sub in value:
                yield (*here, sub), value[sub]
        elif isinstance(value, dict | list):
            yield from walk(value, here)


def field_name(path) -> str:
    """A path as the peer names it: push[0].peer, hidden.shape."""
    name = ""
    for key in path:
        name += f"[{key}]" if type(key) is int else (f".{key}" if name else key)
    return name


# ---------------------------------------------------------------- value makers


def _kind(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin", list: "list", dict: "map",
            type(None): "nil"}[type(value)]


# values of other msgpack types, the confusions a client is likeliest to make first
WRONG_TYPES = {
    "int": {"str": "7", "float": 7.5, "bool": True, "nil": None},
    "str": {"int": 7, "bin": b"x", "nil": None},
    "bool": {"int": 1, "str": "true", "nil": None},
    "bin": {"str": "x", "int": 7},
    "list": {"str": "x", "map": {"0": 1}, "nil": None},
    "map": {"list": [], "str": "x", "nil": None},
}
GENERIC_RANGE = {"int": {"negative": -1, "huge": 2**64 - 1}, "str": {"empty": ""}, "bin": {"empty": b""},
                 "list": {"empty": []}, "map": {"empty": {}}, "bool": {}}


def _bytes_of(dtype: str, values) -> bytes:
    return torch.tensor(values, dtype=WIRE_DTYPES[dtype]).view(torch.uint8).numpy().tobytes()


def _shaped(reshape: Callable[[Ctx, list], list], fill: bool = True):
    """A tensor's shape changed; with `fill`, its data made the size of the new shape (only the shape's
    meaning is wrong then)."""

    def make(ctx: Ctx, shape: list, tensor: dict) -> list:
        new = reshape(ctx, list(shape))
        if fill:
            size = WIRE_DTYPES[tensor["dtype"]].itemsize
            for d in new:
                size *= d
            tensor["data"] = (b"\x01" if tensor["dtype"] == "bool" else b"\x00") * size
        return new

    return make


def _data(make_bytes: Callable[[Ctx, dict], bytes]):
    def make(ctx: Ctx, data: bytes, parent) -> bytes:
        return make_bytes(ctx, parent)

    return make


def _first_value(value):
    """Bytes of a tensor with its first element replaced by `value`."""
    return _data(lambda ctx, t: _bytes_of(t["dtype"], [value]) + t["data"][WIRE_DTYPES[t["dtype"]].itemsize:])


def tensor_table(name: str, other_dtype: str) -> dict:
    """The cases of one tensor field of a step, and the errors the peer answers them with."""
    rank = 3 if name == "hidden" else 2
    table = {
        name: {"range": {"empty_map": ({}, error(f"'{name}.dtype'"))}},
        f"{name}.dtype": {"range": {
            "not_accepted": (other_dtype, error(f"{name}: dtype {other_dtype!r} not accepted")),
            "unknown": ("complex64", error(f"{name}: dtype 'complex64' not accepted")),
            "empty": ("", error(f"{name}: dtype '' not accepted")),
        }},
        f"{name}.data": {"range": {
            "short": (lambda ctx, d, p: d[:-1], error(f"{name}:", "bytes do not match")),
            "long": (lambda ctx, d, p: d + b"\0", error(f"{name}:", "bytes do not match")),
            "empty": (b"", error(f"{name}:", "bytes do not match")),
        }},
    }
    shape = {
        "rank": (_shaped(lambda ctx, s: s[:-1], fill=False), error(f"{name}: expected rank {rank}")),
        "negative": (_shaped(lambda ctx, s: [-1, *s[1:]], fill=False),
                     error(f"{name}: shape must be non-negative")),
        "float_dim": (_shaped(lambda ctx, s: [1.0, *s[1:]], fill=False), error(f"{name}: shape must be")),
        "bool_dim": (_shaped(lambda ctx, s: [True, *s[1:]], fill=False), error(f"{name}: shape must be")),
        "huge_dim": (_shaped(lambda ctx, s: [2**31, *s[1:]], fill=False), error(f"{name}: shape must be")),
        "product_overflow": (_shaped(lambda ctx, s: [2**30] * len(s), fill=False),
                             error(f"{name}:", "bytes do not match")),
        "rows": (_shaped(lambda ctx, s: [2, *s[1:]]), error("hidden: shape [2, 1,", "batch=1")
                 if name == "hidden" else error(f"{name}: shape [2, 1]")),
    }
    if name == "hidden":
        shape |= {
            "hidden_size": (_shaped(lambda ctx, s: [1, 1, s[2] - 1]), error("hidden: shape", "hidden=")),
            "no_tokens": (_shaped(lambda ctx, s: [1, 0, s[2]]), error("hidden: 0 tokens in one step")),
            "too_many_tokens": (_shaped(lambda ctx, s: [1, MAX_TOKENS + 1, s[2]]),
                                error(f"hidden: {MAX_TOKENS + 1} tokens in one step")),
            "past_length": (_shaped(lambda ctx, s: [1, SESSION_LENGTH - ctx.position + 1, s[2]]),
                            error("would overflow the session's declared length")),
        }
        values = {"nan": float("nan"), "inf": float("inf"), "minus_inf": -float("inf")}
        table[f"{name}.data"]["range"] |= {k: (_first_value(v), error("hidden: contains NaN or infinity"))
                                           for k, v in values.items()}
    else:
        shape["tokens"] = (_shaped(lambda ctx, s: [1, 2]), error(f"{name}: shape [1, 2], expected [1, 1]"))
    if name == "position_ids":
        table[f"{name}.data"]["range"] |= {
            "negative": (_first_value(-1), error("position_ids: values must lie in")),
            "past_length": (_first_value(SESSION_LENGTH), error("position_ids: values must lie in")),
        }
    if name == "valid":
        table[f"{name}.data"]["range"]["byte_2"] = (b"\x02", error("valid: bool values must be"))
    table[f"{name}.shape"] = {"range": shape}
    return table


def _minor_table() -> dict:
    return {"missing": SERVED, "range": {
        "negative": (-1, error("'minor'")),
        "newer": (PROTOCOL_MINOR + 1, error(f"v{PROTOCOL_MAJOR}.{PROTOCOL_MINOR + 1} is newer")),
    }}


def _type_table(*others: str, answer: Callable[[str], Expect]) -> dict:
    return {"range": {kind or "empty": (kind, answer(kind)) for kind in others}}


def _hop_int(name: str) -> dict:
    return {"range": {"negative": (-1, error(f"'{name}'")), "huge": (2**62 + 1, error(f"'{name}'"))}}


def _fallback_with_position(position):
    def make(ctx: Ctx, old, parent) -> bool:
        if position is DROP:
            del parent["position"]
        else:
            parent["position"] = position
        return True

    return make


def _step_table() -> dict:
    """A step on an inference session (and, through `_forward_expect`, a forwarded one)."""
    return {
        "type": _type_table("frobnicate", "open", "steps", "",
                            answer=lambda kind: error(f"unknown message type {kind!r}")),
        "minor": _minor_table(),
        "step": _hop_int("step"),
        "position": {"range": {
            "negative": (-1, error("'position'")),
            "huge": (2**30 + 1, error("'position'")),
            "ahead": (lambda ctx, old, p: old + 1, error("step at position", "but the session holds")),
        }},
        **tensor_table("hidden", "float16"),
        **tensor_table("position_ids", "int32"),
        **tensor_table("valid", "uint8"),
        "push": {"missing": SERVED, "wrong_type": {"nil": SERVED}, "range": {
            "empty": ([], SERVED),
            "too_many": (lambda ctx, old, p: old * 257, error("'push'", "257 hops")),
        }},
        "push[0]": {"missing": SERVED, "wrong_type": {}, "range": {"empty": ({}, error("'push[0].peer'"))}},
        "push[0].peer": {"range": {"empty": ("", error("'push[0].peer'")),
                                   "long": ("p" * 129, error("'push[0].peer'"))}},
        "push[0].session": _hop_int("push[0].session"),
        "push[0].step": _hop_int("push[0].step"),
        "push[0].token": {"range": {k: (v, error("'push[0].token'"))
                                    for k, v in {"empty": "", "short": "0" * 31, "long": "0" * 33}.items()}},
        "push[0].dtype": {"range": {k: (k, error("'push[0].dtype'")) for k in ("int64", "float64")}},
        "push[0].minor": {"missing": SERVED, "range": {"negative": (-1, error("'push[0].minor'")),
                                                       "huge": (2**16 + 1, error("'push[0].minor'"))}},
        # a client's own copy of a step it had asked the previous hop to push; it names the position its
        # forwarded copy would have run at (no forwarded step ever ran in this session: each runs)
        "fallback": {"missing": SERVED, "range": {
            "true": (True, SERVED),
            "true_position_missing": (_fallback_with_position(DROP), error("'position'")),
            "true_position_nil": (_fallback_with_position(None), error("'position'")),
            "true_position_str": (_fallback_with_position("0"), error("'position'")),
        }},
    }


def _signed_for(handler: str):
    def make(ctx: Ctx, old, parent) -> str:
        parent["signature"] = _sign(ctx.hello_key, ctx, handler)
        return handler

    return make


def _other_key(bits: int, resign: bool):
    keys: dict[int, Any] = {}

    def make(ctx: Ctx, old, parent) -> bytes:
        if bits not in keys:
            keys[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        if resign:
            parent["signature"] = _sign(keys[bits], ctx, parent["handler"])
        return _der(keys[bits])

    return make


def _all_wrong(kind: str, expect: Expect) -> dict:
    return dict.fromkeys(WRONG_TYPES[kind], expect)


def _flip(ctx: Ctx, old: bytes, parent) -> bytes:
    return bytes([old[0] ^ 1]) + old[1:]


TABLES = {
    "open": {
        "type": _type_table("step", "info", "", answer=lambda kind: error("must be 'open'")),
        "minor": _minor_table(),
        "model_id": {"range": {"other": ("other-model", refused("serves model", "'other-model'")),
                               "empty": ("", refused("serves model"))}},
        "blocks": {"range": {
            "empty": ([], error("'blocks'")), "one": ([0], error("'blocks'")),
            "three": ([0, 1, 2], error("'blocks'")),
            "reversed": ([6, 0], refused("blocks 6:0 are not served")),
            "empty_span": ([2, 2], refused("not served")),
            "past_end": ([0, 7], refused("blocks 0:7 are not served")),
        }},
        "blocks[0]": {"missing": error("'blocks'"), "wrong_type": _all_wrong("int", error("'blocks'")),
                      "range": {"negative": (-1, refused("not served")), "end": (6, refused("not served"))}},
        "blocks[1]": {"missing": error("'blocks'"), "wrong_type": _all_wrong("int", error("'blocks'")),
                      "range": {"past_end": (7, refused("not served")), "zero": (0, refused("not served"))}},
        "batch_size": {"range": {"zero": (0, error("'batch_size'")),
                                 "over_limit": (MAX_BATCH + 1, refused(f"batch size {MAX_BATCH + 1} ")),
                                 "huge": (2**16 + 1, error("'batch_size'"))}},
        "max_length": {"range": {"zero": (0, error("'max_length'")),
                                 "over_limit": (MAX_LENGTH + 1, refused(f"session length {MAX_LENGTH + 1} ")),
                                 "huge": (2**24 + 1, error("'max_length'"))}},
        # how long the client waits for KV room (seconds, a float too); nil or missing: the peer's own time
        "wait_s": {"missing": SERVED, "wrong_type": {"float": SERVED, "nil": SERVED}, "range": {
            "zero": (0, SERVED), "negative": (-1, error("'wait_s'")), "huge": (2**64 - 1, error("'wait_s'")),
            "over_an_hour": (3601, error("'wait_s'"))}},
    },
    "info": {"type": _type_table("open", "step", "", answer=lambda kind: error("'type'", "takes 'info'")),
             "minor": _minor_table()},
    "hello": {
        "type": {"missing": error("must be 'hello'"),
                 "wrong_type": {k: error("must be 'hello'") for k in WRONG_TYPES["str"]},
                 "range": {k or "empty": (k, error("must be 'hello'")) for k in ("welcome", "challenge", "")},
                 },
        "handler": {"range": {
            "unknown": (_signed_for("/swarm/v1/nothing"), refused("no handler '/swarm/v1/nothing'")),
            "empty": (_signed_for(""), refused("no handler ''")),
            "not_signed": (INFO_HANDLER, error("'signature'")),  # the signature is for the inference handler
        }},
        "key": {"range": {
            "empty": (b"", error("'key'", "not a DER public key")),
            "junk": (b"\x30\x03junk", error("'key'", "not a DER public key")),
            "small": (_other_key(1024, resign=True), error("'key'", "expected an RSA key")),
            "not_the_signer": (_other_key(2048, resign=False), error("'signature'")),
        }},
        "signature": {"range": {
            "empty": (b"", error("'signature'")), "flipped": (_flip, error("'signature'")),
            "other_nonce": (lambda ctx, old, p: _sign(ctx.hello_key, ctx, p["handler"], b"\0" * 32),
                            error("'signature'")),
        }},
    },
    "step": _step_table(),
    "rollback": {
        "type": _type_table("frobnicate", "", answer=lambda kind: error(f"unknown message type {kind!r}")),
        "minor": _minor_table(),
        "position": {"range": {"negative": (-1, error("'position'", "cannot roll back to -1")),
                               "ahead": (lambda ctx, old, p: old + 1,
                                         error("'position'", "cannot roll back"))}},
    },
    "close": {
        "type": _type_table("frobnicate", "", answer=lambda kind: error(f"unknown message type {kind!r}")),
        "minor": {**_minor_table(), "missing": CLOSED},
    },
}
VALID = {"open": SERVED, "info": SERVED, "hello": SERVED, "step": SERVED, "rollback": SERVED, "close": CLOSED,
         "forward": counted(received=1), "batch": counted(received=1)}
FATAL = {"open", "info", "hello"}  # answered with a fatal error (the other families' errors are not)


def _resigned(position):
    """A forwarded step's position changed, and its token made for it (so the token check passes)."""

    def make(ctx: Ctx, old, parent) -> int:
        at = position(ctx)
        parent["token"] = push_token(ctx.push_key, ctx.pusher, at)
        return at

    return make


# a forwarded step's claims, checked (for type) before it goes to its session's inbox
FORWARD_CLAIMS = {
    "session": {"missing": CLOSED, "wrong_type": dict.fromkeys(WRONG_TYPES["int"], CLOSED), "range": {
        "negative": (-1, counted(rejected=1)), "huge": (2**64 - 1, counted(rejected=1)),
        "unknown": (lambda ctx, old, p: old + 1000, counted(rejected=1)),
    }},
    "token": {"missing": CLOSED, "wrong_type": dict.fromkeys(WRONG_TYPES["str"], CLOSED), "range": {
        "empty": ("", counted(rejected=1)),
        "other_position": (lambda ctx, old, p: push_token(ctx.push_key, ctx.pusher, ctx.position + 1),
                           counted(rejected=1)),
        "other_pusher": (lambda ctx, old, p: push_token(ctx.push_key, FAKE_PEER, ctx.position),
                         counted(rejected=1)),
    }},
    "position": {"missing": CLOSED, "wrong_type": dict.fromkeys(WRONG_TYPES["int"], CLOSED), "range": {
        "ahead": (lambda ctx, old, p: old + 1, counted(rejected=1)),  # the token is for the old position
        "ahead_signed": (_resigned(lambda ctx: ctx.position + 1), counted(duplicates=1)),
        "negative_signed": (_resigned(lambda ctx: -1), counted(duplicates=1)),
        "huge_signed": (_resigned(lambda ctx: 2**62), counted(duplicates=1)),
    }},
}
BATCH = {
    "type": {"missing": CLOSED, "wrong_type": dict.fromkeys(WRONG_TYPES["str"], CLOSED),
             "range": {"step": ("step", CLOSED), "frobnicate": ("frobnicate", CLOSED)}},
    "minor": {"missing": counted(received=1), "wrong_type": dict.fromkeys(WRONG_TYPES["int"], CLOSED),
              "range": {"negative": (-1, CLOSED), "newer": (PROTOCOL_MINOR + 1, CLOSED)}},
    "steps": {"missing": CLOSED, "wrong_type": dict.fromkeys(WRONG_TYPES["list"], CLOSED), "range": {
        "empty": ([], NOOP),
        # all taken in one go: the backlog holds FORWARD_BACKLOG, the first runs, the others are stale copies
        "over_backlog": (lambda ctx, old, p: old * (FORWARD_BACKLOG + 2),
                         counted(received=1, duplicates=FORWARD_BACKLOG - 1, overflowed=2)),
    }},
    "steps[0]": {"missing": NOOP, "wrong_type": dict.fromkeys(WRONG_TYPES["map"], CLOSED),
                 "range": {"empty": ({}, CLOSED)}},
}


def _forwarded(expect: Expect) -> Expect:
    """What a forwarded step gets where its client's own copy would get `expect`: run, or dropped."""
    if expect.answer == "served":
        return counted(received=1)
    assert expect.answer == "error", expect
    return counted(dropped=1)


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    family: str
    path: tuple
    kind: str  # valid, missing, wrong_type, out_of_range
    label: str
    value: Any  # DROP, a value, or (ctx, old value, its parent) -> value
    expect: Expect
    id: str = field(default="", compare=False)

    def apply(self, ctx: Ctx, message: dict) -> dict:
        message = copy.deepcopy(message)
        if self.kind == "valid":
            return message
        parent = message
        for key in self.path[:-1]:
            parent = parent[key]
        key = self.path[-1]
        if self.value is DROP:
            del parent[key]
        elif callable(self.value):
            parent[key] = self.value(ctx, copy.deepcopy(parent[key]), parent)
        else:
            parent[key] = copy.deepcopy(self.value)
        return message


def _entry(family: str, name: str) -> tuple[dict, Callable[[Expect], Expect]]:
    """The table entry of a field, and what turns a step's expectation into this family's."""
    same = lambda e: e  # noqa: E731
    if family in TABLES:
        return TABLES[family].get(name, {}), same
    if family == "batch":
        if name in BATCH:
            return BATCH[name], same
        name = name.removeprefix("steps[0].")
    if name in FORWARD_CLAIMS:
        return FORWARD_CLAIMS[name], same
    entry = TABLES["step"].get(name, {})
    if family == "forward" and name == "type":  # a lone step that says it is a batch is read as one
        entry = {**entry, "range": {**entry["range"], "steps": ("steps", CLOSED)}}
    return entry, _forwarded


def _default(family: str, name: str) -> Expect:
    return error(f"'{name}'")


def cases_of(family: str) -> list[Case]:
    ctx = Ctx(Target("peer", (), None, MODEL_ID, (0, 6), 8, "float32", 1 << 20, MAX_LENGTH))
    found = [Case(family, (), "valid", "", None, VALID[family], f"{family}:valid")]
    for path, value in walk(template(family, ctx)):
        name = field_name(path)
        entry, convert = _entry(family, name)
        default = _default(family, name if family != "batch" else name.removeprefix("steps[0]."))
        kinds = [("missing", "", DROP, entry.get("missing", default))]
        wrong = entry.get("wrong_type", {})
        kinds += [("wrong_type", label, v, wrong.get(label, default))
                  for label, v in WRONG_TYPES[_kind(value)].items()]
        ranges = entry.get("range")
        if ranges is None:
            ranges = {label: (v, default) for label, v in GENERIC_RANGE[_kind(value)].items()}
        kinds += [("out_of_range", label, v, e) for label, (v, e) in ranges.items()]
        for kind, label, v, expect in kinds:
            expect = convert(expect) if expect.answer in ("error", "served") else expect
            case_id = ":".join(filter(None, [family, name, kind, label]))
            found.append(Case(family, path, kind, label, v, expect, case_id))
    return found


CASES = {family: cases_of(family) for family in VALID}


def _params(*families: str, paths=PATHS) -> list:
    return [pytest.param(case, path, id=f"{path}-{case.id}")
            for family in families for case in CASES[family] for path in paths]


# ---------------------------------------------------------------- the peer, and the raw client's sessions


class RawSession:
    """An inference session of the raw client on one path, reopened when it ends or nears its length."""

    def __init__(self, wire: Wire, target: Target, path: str):
        self.wire, self.target, self.path = wire, target, path
        self.stream = None
        self.session, self.push_key, self.position = 0, "", 0

    async def ready(self) -> None:
        if self.stream is not None and self.position <= SESSION_LENGTH - 4:
            return
        self.close()
        reader, writer = await self.wire.open(self.target, "inference", self.path)
        writer.write(frame(msgpack.packb(open_message(self.target, 1, SESSION_LENGTH))))
        opened = (await answers(reader, 1)).replies[0]
        assert opened.get("type") == "opened", opened
        self.stream, self.session, self.push_key, self.position = (reader, writer), opened["session"], \
            opened["push_key"], 0

    def ctx(self, pusher: str) -> Ctx:
        return Ctx(self.target, pusher, self.position, self.session, self.push_key)

    def close(self) -> None:
        if self.stream is not None:
            self.stream[1].close()
        self.stream = None


@dataclass
class Env:
    server: Any
    wire: Wire
    target: Target
    errors: PeerErrors
    sessions: dict = field(default_factory=dict)  # path -> RawSession for step, rollback and close cases
    forward: RawSession | None = None  # the session forwarded steps go to

    def run(self, coro):
        return self.wire.run(coro, timeout_s=120)


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    servers = inprocess_swarm.start_peers(tiny_model_path("llama"), [SPAN], model_id=MODEL_ID, **PEER_LIMITS)
    wire = None
    errors = PeerErrors().__enter__()
    try:
        wire = Wire(inprocess_swarm.initial_peers)
        target = Target.of(servers[0])
        assert target.direct, "the peer must listen on a direct port"
        env = Env(servers[0], wire, target, errors)
        env.sessions = {path: RawSession(wire, target, path) for path in PATHS}
        env.forward = RawSession(wire, target, "p2pd")
        yield env
    finally:
        errors.__exit__()
        if wire is not None:
            for session in [*env.sessions.values(), env.forward]:
                session.close()
            wire.close()
        for server in servers:
            inprocess_swarm.stop_peer(server)


async def _send(writer, message: dict) -> None:
    writer.write(frame(msgpack.packb(message, use_bin_type=True)))
    await writer.drain()


def _check(case: Case, answer, served_type: str) -> None:
    expect = case.expect
    if expect.answer == "closed":
        assert answer.ended and not answer.replies and not answer.timed_out, (case.id, answer)
        return
    assert not answer.timed_out, f"{case.id}: silence"
    assert len(answer.replies) == 1, (case.id, answer)
    reply = answer.replies[0]
    if expect.answer == "served":
        assert reply.get("type") == served_type, (case.id, reply)
        return
    assert reply.get("type") == "error", (case.id, reply)
    assert reply.get("fatal") is (case.family in FATAL), (case.id, reply)
    assert reply.get("code") == expect.code, (case.id, reply)
    for name in expect.names:
        assert name in reply.get("message", ""), f"{case.id}: {name!r} not in {reply.get('message')!r}"


def _same_paths(family: str, message: dict) -> None:
    """The message the case mutates has the fields the cases were made from."""
    collected = {c.path for c in CASES[family] if c.kind != "valid"}
    assert {p for p, _ in walk(message)} == collected, f"{family}: fields differ from those collected"


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("case,path", _params("open", "info"))
def test_stream_open_fields(env, case, path):
    """The first message of an inference or info stream: a fatal error naming the field, or served."""
    handler = "inference" if case.family == "open" else "info"

    async def go():
        message = template(case.family, Ctx(env.target))
        _same_paths(case.family, message)
        reader, writer = await env.wire.open(env.target, handler, path)
        try:
            await _send(writer, case.apply(Ctx(env.target), message))
            return await answers(reader, 1)
        finally:
            writer.close()

    _check(case, env.run(go()), "opened" if case.family == "open" else "info")


@pytest.mark.parametrize("case,path", _params("hello", paths=("direct",)))
def test_direct_hello_fields(env, case, path):
    """The direct port's hello, answering the peer's challenge: a fatal error naming the field, or welcome."""

    async def go():
        reader, writer = await env.wire.tls(env.target)
        try:
            challenge = await asyncio.wait_for(read_message(reader, HELLO_BYTES), REPLY_TIMEOUT_S)
            ctx = Ctx(env.target, nonce=challenge["nonce"], hello_key=env.wire.hello_identity.private_key)
            message = template("hello", ctx)
            _same_paths("hello", message)
            await _send(writer, case.apply(ctx, message))
            return await answers(reader, 1)
        finally:
            writer.close()

    _check(case, env.run(go()), "welcome")


@pytest.mark.parametrize("case,path", _params("step", "rollback", "close"))
def test_session_message_fields(env, case, path):
    """Messages on an open session: a non-fatal error naming the field (the session goes on), or served."""
    session = env.sessions[path]

    async def go():
        await session.ready()
        ctx = session.ctx(env.wire.peer_id)
        message = template(case.family, ctx)
        _same_paths(case.family, message)
        reader, writer = session.stream
        await _send(writer, case.apply(ctx, message))
        answer = await answers(reader, 1)
        if answer.ended or answer.timed_out:
            session.close()
        for reply in answer.replies:
            if reply.get("type") in ("result", "rolled_back"):
                session.position = reply["position"]
        return answer

    served = {"step": "result", "rollback": "rolled_back"}.get(case.family, "")
    _check(case, env.run(go()), served)


async def _figures(env: Env) -> dict:
    forward = (await env.wire.info(env.target))["forward"]
    return {k: forward[k] for k in FIGURES}


async def _moved(env: Env, before: dict, total: int) -> dict:
    """The forward figures' moves since `before`, once they add up to `total` (silence otherwise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_TIMEOUT_S
    while True:
        now = await _figures(env)
        moved = {k: now[k] - before[k] for k in FIGURES if now[k] != before[k]}
        if sum(moved.values()) >= total or loop.time() > deadline:
            return moved
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("case,path", _params("forward", "batch"))
def test_forwarded_step_fields(env, case, path):
    """Forwarded steps, alone and batched: the stream ends, or the peer counts (or runs) every step."""
    session = env.forward

    async def go():
        await session.ready()
        ctx = session.ctx(env.wire.peer_id)
        message = template(case.family, ctx)
        _same_paths(case.family, message)
        before = await _figures(env)
        reader, writer = await env.wire.open(env.target, "forward", path)
        try:
            await _send(writer, case.apply(ctx, message))
            if case.expect.answer == "closed":
                closed = await until_closed(reader, REPLY_TIMEOUT_S)
                assert closed, f"{case.id}: silence (the stream stayed open)"
                expected = {}
            elif case.expect.answer == "noop":  # nothing to count: the stream must still take a step
                await _send(writer, template("forward", ctx))
                expected = {"received": 1}
            else:
                expected = dict(case.expect.counts)
            moved = await _moved(env, before, sum(expected.values()))
        finally:
            writer.close()
        if moved.get("received"):
            results = await answers(session.stream[0], moved["received"])
            assert [r.get("type") for r in results.replies] == ["result"] * moved["received"], results
            session.position = results.replies[-1]["position"]
        return expected, moved

    expected, moved = env.run(go())
    assert moved == expected, f"{case.id}: forward figures moved {moved}, expected {expected}"


def test_peer_idle_after_the_cases(env):
    """The peer answers info over both paths, and once the raw client's sessions close it holds none."""
    for session in [*env.sessions.values(), env.forward]:
        session.close()

    async def idle():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLY_TIMEOUT_S
        while True:
            info = await env.wire.info(env.target)
            if info["active_sessions"] == 0 or loop.time() > deadline:
                return info
            await asyncio.sleep(0.02)

    info = env.run(idle())
    assert info["active_sessions"] == 0, info
    assert info["cache_tokens_left"] == env.server.config.cache_tokens, info
    assert env.run(env.wire.info(env.target, "direct"))["type"] == "info"
    assert not env.errors.records, env.errors.records[:5]
