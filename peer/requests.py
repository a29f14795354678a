"""Strict decoders for what clients send a peer. Pure: message in, typed request out, ProtocolError or
PeerRefused naming the problem otherwise. Nothing here touches sessions or tensors' contents beyond checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.errors import PeerRefused, ProtocolError
from swarm.protocol import all_finite, check_minor, int_range, require, require_int, unpack_tensor
from swarm.spans import Span


@dataclass(frozen=True)
class OpenRequest:
    model_id: str
    blocks: tuple[int, int]
    batch_size: int
    max_length: int
    wait_s: float | None = None  # how long the client will wait for KV room (None: the peer's admission time)


MAX_PUSH_HOPS = 256
PUSH_TOKEN_CHARS = 32
FLOAT_WIRE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PushTarget:
    """The next hop of a route, where a step's output goes straight after this peer computes it."""

    peer: str
    session: int
    token: str  # swarm.protocol.push_token: good for this pusher and this step's position only
    step: int
    dtype: str  # the next peer's wire dtype: the pushed hidden states travel in it
    minor: int = 1  # the next peer's protocol minor (from its "opened"): 2 or later takes batches

    def as_dict(self) -> dict:
        return {"peer": self.peer, "session": self.session, "token": self.token, "step": self.step,
                "dtype": self.dtype, "minor": self.minor}


@dataclass(frozen=True)
class StepRequest:
    step_id: int
    position: int
    hidden: torch.Tensor  # [batch, new, hidden_size]
    position_ids: torch.Tensor  # [batch, new] int64
    valid: torch.Tensor  # [batch, new] bool
    push: tuple[PushTarget, ...] = ()  # the rest of the route after this hop ("push"); empty: reply only


def message_type(message: dict) -> str:
    check_minor(message)
    return require(message.get("type"), str, "type")


def parse_open(message: dict, model_id: str, span: Span, max_length_limit: int) -> OpenRequest:
    asked_model = require(message.get("model_id"), str, "model_id")
    if asked_model != model_id:
        raise PeerRefused(f"this peer serves model {model_id!r}, not {asked_model!r}")
    blocks = require(message.get("blocks"), list, "blocks")
    if len(blocks) != 2 or not all(type(b) is int for b in blocks):
        raise ProtocolError("field 'blocks': expected [start, end] integers")
    start, end = blocks
    if not (span.start <= start < end <= span.end):
        raise PeerRefused(f"blocks {start}:{end} are not served here; this peer serves {span}")
    batch_size = require_int(message.get("batch_size"), "batch_size", 1, 1 << 16)
    max_length = require_int(message.get("max_length"), "max_length", 1, 1 << 24)
    if max_length > max_length_limit:
        raise PeerRefused(f"session length {max_length} exceeds this peer's limit of {max_length_limit} tokens")
    wait_s = message.get("wait_s")
    if wait_s is not None:
        if type(wait_s) not in (int, float) or not 0 <= wait_s <= 3600:
            raise ProtocolError("field 'wait_s': expected seconds in [0, 3600]")
        wait_s = float(wait_s)
    return OpenRequest(asked_model, (start, end), batch_size, max_length, wait_s)


def parse_step(
    message: dict,
    *,
    batch_size: int,
    hidden_size: int,
    dtype_name: str,
    position: int,
    max_length: int,
    max_tokens_per_step: int,
) -> StepRequest:
    step_id = require_int(message.get("step"), "step", 0, 1 << 62)
    claimed = require_int(message.get("position"), "position", 0, 1 << 30)
    if claimed != position:
        raise ProtocolError(f"step at position {claimed}, but the session holds {position} tokens")
    hidden = unpack_tensor(message.get("hidden"), "hidden", dtypes={dtype_name}, rank=3)
    if hidden.shape[0] != batch_size or hidden.shape[2] != hidden_size:
        raise ProtocolError(
            f"hidden: shape {list(hidden.shape)} does not match [batch={batch_size}, tokens, hidden={hidden_size}]"
        )
    new = hidden.shape[1]
    if not 1 <= new <= max_tokens_per_step:
        raise ProtocolError(f"hidden: {new} tokens in one step; this peer takes 1..{max_tokens_per_step}")
    if position + new > max_length:
        raise ProtocolError(
            f"step of {new} tokens at position {position} would overflow the session's declared length {max_length}"
        )
    if not all_finite(message["hidden"]):
        raise ProtocolError("hidden: contains NaN or infinity")
    position_ids = unpack_tensor(message.get("position_ids"), "position_ids", dtypes={"int64"}, rank=2)
    valid = unpack_tensor(message.get("valid"), "valid", dtypes={"bool"}, rank=2)
    for name, tensor in (("position_ids", position_ids), ("valid", valid)):
        if list(tensor.shape) != [batch_size, new]:
            raise ProtocolError(f"{name}: shape {list(tensor.shape)}, expected [{batch_size}, {new}]")
    low_high = int_range(message["position_ids"])
    if low_high is not None and (low_high[0] < 0 or low_high[1] >= max_length):
        raise ProtocolError(f"position_ids: values must lie in [0, {max_length})")
    return StepRequest(step_id, claimed, hidden, position_ids, valid, parse_push(message.get("push")))


def parse_push(value) -> tuple[PushTarget, ...]:
    """The optional "push" field of a step: the route's next hops, each checked before anyone dials it."""
    if value is None:
        return ()
    hops = require(value, list, "push")
    if len(hops) > MAX_PUSH_HOPS:
        raise ProtocolError(f"field 'push': {len(hops)} hops, at most {MAX_PUSH_HOPS}")
    targets = []
    for i, hop in enumerate(hops):
        hop = require(hop, dict, f"push[{i}]")
        peer = require(hop.get("peer"), str, f"push[{i}].peer")
        if not 0 < len(peer) <= 128:
            raise ProtocolError(f"field 'push[{i}].peer': a peer id of 1..128 chars")
        token = require(hop.get("token"), str, f"push[{i}].token")
        if len(token) != PUSH_TOKEN_CHARS:
            raise ProtocolError(f"field 'push[{i}].token': expected {PUSH_TOKEN_CHARS} chars")
        dtype = require(hop.get("dtype"), str, f"push[{i}].dtype")
        if dtype not in FLOAT_WIRE_DTYPES:
            raise ProtocolError(f"field 'push[{i}].dtype': {dtype!r} is not one of {', '.join(FLOAT_WIRE_DTYPES)}")
        targets.append(PushTarget(
            peer, require_int(hop.get("session"), f"push[{i}].session", 0, 1 << 62), token,
            require_int(hop.get("step"), f"push[{i}].step", 0, 1 << 62), dtype,
            require_int(hop.get("minor", 1), f"push[{i}].minor", 0, 1 << 16),
        ))
    return tuple(targets)


def parse_rollback(message: dict, *, position: int) -> int:
    """The position a "rollback" takes its session back to: an int in [0, position] (the session's own)."""
    target = require(message.get("position"), int, "position")
    if not 0 <= target <= position:
        raise ProtocolError(
            f"field 'position': cannot roll back to {target}; the session holds {position} tokens, so a "
            f"rollback goes to a position in [0, {position}]"
        )
    return target
