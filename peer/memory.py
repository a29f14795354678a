"""Memory planning for a span, before anything is loaded: what it will take, what is free, how many blocks
fit when no span is given, and advice when it does not fit. Pure except `free_bytes`, which reads the
machine, and `block_weight_bytes`, which reads checkpoint headers."""

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


def block_weight_bytes(model_path: str, dtype: torch.dtype, quant: str = "none") -> list[int]:
    """Each block's weights on the device in `dtype` under weight scheme `quant` (no tensor is read)."""
    from swarm.runtime.loading import block_weight_bytes as weights

    return weights(model_path, dtype, quant)


def blocks_that_fit(
    budget_bytes: int, block_weights: list[int], kv_bytes_per_block: int, fixed_bytes: int
) -> int:
    """How many blocks a peer takes when no span is given: the largest k such that
    (the k heaviest blocks' weights + k x `kv_bytes_per_block` + `fixed_bytes`) x HEADROOM fits
    `budget_bytes`. The heaviest blocks, because the start is chosen later (mixture-of-experts models mix
    dense and sparse blocks). `kv_bytes_per_block`: the KV reserve that grows with the span (a budget in
    tokens); `fixed_bytes`: what does not (a budget in bytes, activations). 0 = not even one block fits."""
    heaviest = sorted(block_weights, reverse=True)
    need = fixed_bytes
    for k, weights in enumerate(heaviest, start=1):
        need += weights + kv_bytes_per_block
        if need * HEADROOM > budget_bytes:
            return k - 1
    return len(heaviest)


def activation_bytes(config, max_batch_tokens: int) -> int:
    """Room for one batched forward's activations: a generous 32 x hidden_size x 4 bytes per token row."""
    return 32 * config.hidden_size * 4 * max_batch_tokens


def auto_cache_bytes(free: int, config, max_batch_tokens: int) -> int:
    """KV budget when told "auto": 90% of the free memory after loading, less room for one batched
    forward's activations (a generous 32 x hidden_size x 4 bytes per token row)."""
    return max(0, int((free - activation_bytes(config, max_batch_tokens)) * 0.9))


def fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def blocks_to_take(config, model_config, dtype: torch.dtype) -> tuple[int, str]:
    """How many blocks a peer with no --blocks serves, and a line saying why: --num-blocks if given,
    else as many as fit the memory budget (--memory, else what the device has free) by `blocks_that_fit`,
    with a KV reserve of --cache-bytes, or --cache-tokens slots per block (also for "auto"), and room for
    one batched forward's activations. Raises ConfigError if not even one block fits."""
    from swarm.runtime.loading import span_memory

    num_blocks = model_config.num_hidden_layers
    if config.num_blocks is not None:
        if config.num_blocks > num_blocks:
            raise ConfigError(f"--num-blocks {config.num_blocks}: the model has only {num_blocks} blocks")
        return config.num_blocks, f"{config.num_blocks} blocks (--num-blocks)"
    weights = block_weight_bytes(config.model_path, dtype, config.quant)
    fixed = activation_bytes(model_config, config.max_batch_tokens)
    if config.kv_offload:  # the KV cache lives in host RAM: none of it on the device
        kv_per_block = 0
    elif isinstance(config.cache_bytes, int):
        kv_per_block, fixed = 0, fixed + config.cache_bytes
    else:
        one = span_memory(config.model_path, Span(0, 1), dtype, config.quant, config.kv_dtype)
        kv_per_block = one.kv_bytes(config.cache_tokens)
    offload = config.offload_blocks
    if offload:  # two blocks' staging on the device; the offloaded blocks themselves in host RAM
        fixed += sum(sorted(weights, reverse=True)[:2])
    budget = config.memory_bytes or free_bytes(config.device)
    k = min(blocks_that_fit(budget, weights, kv_per_block, fixed) + offload, num_blocks)
    if k == 0 or k == offload:
        raise ConfigError(
            f"not enough memory for even one block: {fmt(max(weights))} of weights + "
            f"{fmt(kv_per_block + fixed)} of KV cache and activations in a budget of {fmt(budget)}; "
            "lower --cache-tokens / --cache-bytes, "
            "use --dtype bfloat16 or a bigger device"
        )
    precision = f", {config.quant} weights" if config.quant != "none" else ""
    precision += ", fp8 KV cache" if config.kv_dtype == "fp8" else ""
    host = f", {offload} of them with weights in host RAM" if offload else ""
    return k, (f"{k} of {num_blocks} blocks fit {fmt(budget)} (up to {fmt(max(weights))} of weights and "
               f"{fmt(kv_per_block)} of KV cache per block, {fmt(fixed)} fixed{precision}{host})")
