"""The state of checking one hop (client.verifier): its outputs since the last agreeing check, the shadow
route it is checked against, and what a conviction leaves the session to redo.

Mutated only on the client loop (client.verifier runs every change there).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch


@dataclass
class Repair:
    """What the session must redo: from `position` on, around `peers` (convicted), with pushes off or not."""

    position: int
    peers: set[str] = field(default_factory=set)
    push_off: bool = False

    def merge(self, other: Repair) -> None:
        self.position = min(self.position, other.position)
        self.peers |= other.peers
        self.push_off |= other.push_off


class Shadow:
    """A route for one hop's blocks around its peer, fed that hop's inputs; `position`: tokens it holds."""

    def __init__(self, hops, chunk_tokens: int):
        self.hops = hops  # HopState list (their kept inputs are not used: the primary's are the reference)
        self.chunk_tokens = chunk_tokens
        self.position = 0

    @property
    def peers(self) -> list[str]:
        return [h.peer_id for h in self.hops]

    async def outputs(self, kept, first: int, end: int) -> torch.Tensor:
        """[batch, end - first, hidden]: the route's outputs for positions [first, end), feeding it kept
        inputs (hidden, position_ids, valid over [0, >= end)) from where it stands (rolled back first if it
        stands past `first`)."""
        if self.position > first:
            for hop in self.hops:
                await hop.stream.rollback(first)
            self.position = first
        hidden, position_ids, valid = (t[:, self.position : end] for t in kept)
        outs = []
        for offset in range(0, hidden.shape[1], self.chunk_tokens):
            part = slice(offset, offset + self.chunk_tokens)
            h = hidden[:, part]
            for hop in self.hops:
                h = await hop.stream.step(h, position_ids[:, part], valid[:, part], self.position)
            outs.append(h)
            self.position += h.shape[1]
        out = torch.cat(outs, dim=1)
        return out[:, out.shape[1] - (end - first) :]

    async def close(self) -> None:
        await asyncio.gather(*(h.stream.close() for h in self.hops), return_exceptions=True)


class HopCheck:
    """The checking state of one hop: outputs since its last agreeing check, its shadow, its check task."""

    def __init__(self, hop, verified_upto: int):
        self.hop = hop
        self.verified_upto = verified_upto  # outputs before this position are checked (or not this peer's)
        # (position, out [batch, n, hidden], valid [batch, n], pushed) per step, since verified_upto
        self.outputs: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []
        self.shadow: Shadow | None = None
        self.task: asyncio.Task | None = None
        self.wanted = False  # a check was drawn while one ran: start another when it ends
        self.cut: int | None = None  # the lowest rollback while a check ran (its answer is void past it)
        self.retry_at = 0.0  # monotonic time before which no check starts (none could, lately)

    @property
    def end(self) -> int:
        if not self.outputs:
            return self.verified_upto
        position, out, _, _ = self.outputs[-1]
        return position + out.shape[1]

    def truncate(self, position: int) -> None:
        self.verified_upto = min(self.verified_upto, position)
        kept = []
        for at, out, valid, pushed in self.outputs:
            if at + out.shape[1] <= position:
                kept.append((at, out, valid, pushed))
            elif at < position:
                kept.append((at, out[:, : position - at], valid[:, : position - at], pushed))
        self.outputs = kept
        if self.task is not None:
            self.cut = position if self.cut is None else min(self.cut, position)

    def accept(self, end: int) -> None:
        upto = end if self.cut is None else min(end, self.cut)
        self.verified_upto = max(self.verified_upto, upto)
        self.outputs = [o for o in self.outputs if o[0] >= self.verified_upto]

    def joined(self, first: int, end: int):
        """(out, valid, pushed) over [first, end) from the kept outputs, or None if they do not cover it."""
        parts = [o for o in self.outputs if o[0] < end and o[0] + o[1].shape[1] > first]
        if not parts or parts[0][0] > first:
            return None
        out = torch.cat([o[1] for o in parts], dim=1)[:, first - parts[0][0] :][:, : end - first]
        valid = torch.cat([o[2] for o in parts], dim=1)[:, first - parts[0][0] :][:, : end - first]
        pushed = torch.cat([torch.full((o[1].shape[1],), o[3]) for o in parts])
        pushed = pushed[first - parts[0][0] :][: end - first]
        return (out, valid, pushed) if out.shape[1] == end - first else None
