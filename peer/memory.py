"""Memory planning for a span, before anything is loaded: what it will take, what is free, and advice
when it does not fit. Pure except `free_bytes`, which reads the machine."""

from __future__ import annotations

import torch

from swarm.errors import ConfigError
from swarm.runtime.loading import SpanMemory
from swarm.spans import Span

GiB = 1 << 30
HEADROOM = 1.1  # activations, allocator slack


def free_bytes(device: str) -> int:
    """Memory available for a new allocation on `device` (GPU: free device memory; CPU: MemAvailable)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def describe(memory: SpanMemory, span: Span, cache_bytes: int | None, device: str, free: int) -> str:
    """What the span will take; `cache_bytes` None means the KV budget is what the weights leave free."""
    if cache_bytes is None:
        kv = "the KV cache in most of the memory left"
    else:
        kv = f"up to {fmt(cache_bytes)} of KV cache ({cache_bytes // memory.kv_bytes_per_token} token slots)"
    return f"blocks {span} need {fmt(memory.weights_bytes)} of weights + {kv} on {device}; {fmt(free)} free"


def check_fits(memory: SpanMemory, span: Span, cache_bytes: int, device: str, free: int) -> None:
    """Raise ConfigError with concrete advice when the span and its cache budget do not fit."""
    need = (memory.weights_bytes + cache_bytes) * HEADROOM
    if need <= free:
        return
    per_block = (memory.weights_bytes + cache_bytes) / span.length * HEADROOM
    fitting = int(free // per_block) if per_block else 0
    advice = (
        f"serve fewer blocks (about {fitting}: --blocks {span.start}:{span.start + fitting})"
        if fitting >= 1 else "this device cannot hold even one block; use a bigger one or --dtype bfloat16"
    )
    raise ConfigError(
        f"not enough memory: {describe(memory, span, cache_bytes, device, free)}; {advice}, "
        "or lower --cache-tokens / --cache-bytes"
    )


def auto_cache_bytes(free: int, config, max_batch_tokens: int) -> int:
    """KV budget when told "auto": 90% of the free memory after loading, less room for one batched
    forward's activations (a generous 32 x hidden_size x 4 bytes per token row)."""
    activations = 32 * config.hidden_size * 4 * max_batch_tokens
    return max(0, int((free - activations) * 0.9))


def fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
