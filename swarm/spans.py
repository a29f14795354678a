"""Vocabulary fixed once: blocks, spans, model ids.

*block* = one transformer layer index; *span* = a half-open block range [start, end) served by one peer;
*route* = ordered spans covering [0, num_blocks).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from swarm.errors import ConfigError


@dataclass(frozen=True, order=True)
class Span:
    """A half-open range of blocks [start, end)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ConfigError(f"invalid span [{self.start}, {self.end}): need 0 <= start < end")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str, num_blocks: int | None = None) -> Span:
        """Parse 'START:END' (END exclusive), checking it against the model's block count if given."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"--blocks {text!r}: expected START:END, for example 0:8")
        span = cls(int(match.group(1)), int(match.group(2)))
        if num_blocks is not None and span.end > num_blocks:
            raise ConfigError(f"--blocks {text}: the model has only {num_blocks} blocks (0:{num_blocks})")
        return span


_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def default_model_id(model_path: str) -> str:
    """The model id both peer and client derive from a checkpoint path or hub name.

    A hub name 'org/name' and a folder '/any/where/name' both give 'name', so two machines with the
    checkpoint in different places agree.
    """
    name = os.path.basename(os.path.normpath(model_path))
    return check_model_id(name)


def check_model_id(model_id: str) -> str:
    if not _MODEL_ID_RE.match(model_id) or ".." in model_id:
        raise ConfigError(
            f"model id {model_id!r} is not valid: use 1-96 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (set --model-id)"
        )
    return model_id
