"""Compute throughput: measured once per device and model, cached in a small JSON file, announced.

What is announced (the record's `compute_tokens_s`) is per block, as the client's route planner reads it:
tokens per second one block of this peer runs in a decode-like forward (16 sessions' single-token steps
batched), measured over the whole span the peer serves (span time / span length), so a token through its
span of k blocks takes k / compute_tokens_s seconds and the span's own throughput is compute_tokens_s / k.

The cache (`ThroughputCache`) maps a key naming what the figure depends on (device name, dtype, the model
config's hash, torch CPU threads, the measurement's own version) to the figure, in one JSON file:
`--throughput-cache FILE`, else $SWARM_CACHE_DIR/throughput.json, else $XDG_CACHE_HOME/swarm/throughput.json,
else ~/.cache/swarm/throughput.json. A missing, unreadable or malformed file is an empty cache (logged);
writes replace the file atomically, so peers sharing one machine never see half a file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METHOD = "decode16-v1"  # bump when the measurement changes: old cached figures then no longer apply
MEASURE_ROWS = 16
MEASURE_REPEATS = 3
MAX_ENTRIES = 256  # a cache file never grows without bound


def default_cache_path() -> Path:
    base = os.environ.get("SWARM_CACHE_DIR")
    if base:
        return Path(base) / "throughput.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "swarm" / "throughput.json"


def device_name(device: torch.device) -> str:
    """What the figure is a property of: the GPU's name, or the CPU's model name and architecture."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return f"cpu:{model or 'unknown'}:{platform.machine()}"


@dataclass(frozen=True)
class ThroughputKey:
    device: str  # device_name()
    dtype: str
    config_hash: str
    threads: int  # torch CPU threads (the CPU figure depends on it); 0 on CUDA
    method: str = METHOD

    def text(self) -> str:
        return "|".join((self.device, self.dtype, self.config_hash, str(self.threads), self.method))


class ThroughputCache:
    """Per-block tokens/s by ThroughputKey, in one JSON file (see the module docstring)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_path()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("throughput cache %s is unreadable (%s); measuring again", self.path, e)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    def get(self, key: ThroughputKey) -> float | None:
        entry = self._read().get(key.text())
        value = entry.get("tokens_s") if isinstance(entry, dict) else None
        if type(value) in (int, float) and math.isfinite(value) and value > 0:
            return float(value)
        return None

    def put(self, key: ThroughputKey, tokens_s: float) -> None:
        """Store the figure (best effort: a read-only home only costs a measurement next time)."""
        entries = self._read()
        entries[key.text()] = {"tokens_s": tokens_s, "measured_at": time.time()}
        newest = sorted(entries.items(), key=lambda kv: -_measured_at(kv[1]))[:MAX_ENTRIES]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, prefix=".throughput-", delete=False
            ) as f:
                json.dump({"version": 1, "entries": dict(newest)}, f, indent=1, sort_keys=True)
            os.replace(f.name, self.path)
        except OSError as e:
            logger.warning("could not write the throughput cache %s: %s", self.path, e)


def _measured_at(entry: object) -> float:
    value = entry.get("measured_at") if isinstance(entry, dict) else None
    return float(value) if type(value) in (int, float) else 0.0


def measure_span(
    span_model, hidden_size: int, rows: int = MEASURE_ROWS, repeats: int = MEASURE_REPEATS
) -> float:
    """Per-block tokens/s of the whole loaded span: `rows` single-token steps batched on a scratch cache,
    the best of `repeats` runs (the first also warms up kernels). Runs on the caller's thread."""
    hidden = torch.zeros(rows, 1, hidden_size)  # [rows, tokens=1, hidden]
    valid = torch.ones(rows, 1, dtype=torch.bool)
    positions = torch.zeros(rows, 1, dtype=torch.long)
    best = float("inf")
    for _ in range(repeats):
        cache = span_model.new_cache(rows, 1)
        try:
            start = time.perf_counter()
            span_model(hidden, positions, valid, cache)
            if span_model.device.type == "cuda":
                torch.cuda.synchronize(span_model.device)
            best = min(best, time.perf_counter() - start)
        finally:
            cache.free()
    return rows * span_model.span.length / max(best, 1e-6)


def throughput_key(device: torch.device, dtype_name: str, config_hash: str) -> ThroughputKey:
    threads = 0 if device.type == "cuda" else torch.get_num_threads()
    return ThroughputKey(device_name(device), dtype_name, config_hash, threads)
