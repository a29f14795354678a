"""Read selected tensors of a Hugging Face checkpoint folder without touching the others.

A checkpoint is `model.safetensors`, or shards listed in `model.safetensors.index.json`. The reader opens
only the shards that hold the requested keys and reads only those keys, so a peer for blocks 0:2 never
reads the tensors of block 5 (`keys_read` records what was read, for tests and audits).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from swarm.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_BLOCK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_of_key(key: str) -> int | None:
    """The decoder block a checkpoint key belongs to ('model.layers.3.mlp...' -> 3), or None."""
    match = _BLOCK_KEY.search(key)
    return int(match.group(1)) if match else None


class CheckpointReader:
    """Lazily reads tensors by key from a local checkpoint folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ConfigError(
                f"{self.folder}: not a model folder (no config.json); pass the folder of a Hugging Face checkpoint"
            )
        self.key_to_file = self._index()
        self.keys_read: list[str] = []

    def _index(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {key: SINGLE_FILE for key in f.keys()}
        raise ConfigError(f"{self.folder}: no {INDEX_FILE} or {SINGLE_FILE}; only safetensors checkpoints are served")

    def keys(self, select: Callable[[str], bool]) -> list[str]:
        return sorted(k for k in self.key_to_file if select(k))

    def _by_file(self, keys: Iterable[str]) -> list[tuple[Path, list[str]]]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.key_to_file[key]].append(key)
        out = []
        for file, file_keys in sorted(by_file.items()):
            path = self.folder / file
            if not path.is_file():
                raise ConfigError(f"{path}: shard listed in the index is missing; the checkpoint is incomplete")
            out.append((path, file_keys))
        return out

    def numel(self, keys: Iterable[str]) -> int:
        """Elements in these tensors, from the shards' headers only (no tensor data is read)."""
        total = 0
        for path, file_keys in self._by_file(keys):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in file_keys:
                    total += math.prod(f.get_slice(key).get_shape())
        return total

    def read(self, keys: Iterable[str], *, progress: bool = False) -> dict[str, torch.Tensor]:
        """Read exactly these keys (on CPU, checkpoint dtype), opening each needed shard once."""
        keys = list(keys)
        out: dict[str, torch.Tensor] = {}
        with tqdm(total=len(keys), desc="Reading tensors", unit="tensor", disable=not progress) as bar:
            for path, file_keys in self._by_file(keys):
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in file_keys:
                        out[key] = f.get_tensor(key)
                        self.keys_read.append(key)
                        bar.update()
        return out
