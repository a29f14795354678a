"""What serves one loaded span: its KV budget, scheduler and session manager, built together so that a
peer that moves (peer.rebalance) swaps all of them at once. Also the memory plan checked before loading.

Mutates nothing; `plan_memory` raises ConfigError when the span and its KV budget do not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peer.config import PeerConfig
from peer.memory import HEADROOM, auto_cache_bytes, check_fits, describe, fmt, free_bytes
from peer.scheduler import Scheduler
from peer.sessions import SessionManager
from swarm.errors import ConfigError
from swarm.runtime import KVBudget, SpanModel
from swarm.runtime.loading import span_memory
from swarm.spans import Span


@dataclass(frozen=True)
class SpanStack:
    span_model: SpanModel
    budget: KVBudget
    scheduler: Scheduler  # not started
    sessions: SessionManager


def plan_memory(
    config: PeerConfig, span: Span, dtype: torch.dtype, model_id: str, say: Callable[[str], None]
) -> int | None:
    """Say what `span` will take and check that it fits (ConfigError if not); returns the KV budget in
    bytes, None for "auto" (decided once the weights are loaded)."""
    memory = span_memory(config.model_path, span, dtype, config.quant, config.kv_dtype, config.offload_blocks)
    free = free_bytes(config.device)
    planned = config.cache_bytes if isinstance(config.cache_bytes, int) else None
    if planned is None and config.cache_bytes != "auto":
        planned = memory.kv_bytes(config.cache_tokens)
    plan = describe(memory, span, planned, config.device, free)
    say(f"loading {model_id}: {plan}{_host_part(config, memory)}")
    check_fits(memory, span, 0 if config.kv_offload else planned or 0, config.device, free)
    host = memory.host_bytes + (planned or 0 if config.kv_offload else 0)
    if host and config.device != "cpu" and host * HEADROOM > free_bytes("cpu"):
        raise ConfigError(f"not enough host RAM for what this peer keeps there ({fmt(host)}; "
                          f"{fmt(free_bytes('cpu'))} free): lower --offload-blocks or --cache-bytes")
    return planned


def _host_part(config: PeerConfig, memory) -> str:
    parts = []
    if memory.host_bytes:
        parts.append(f"{fmt(memory.host_bytes)} of weights ({config.offload_blocks} blocks)")
    if config.kv_offload:
        parts.append("the KV cache")
    return f"; in host RAM: {' and '.join(parts)}" if parts else ""


def build_stack(
    config: PeerConfig,
    span_model: SpanModel,
    model_config,
    planned: int | None,
    batch_wait_s: float,
    say: Callable[[str], None],
) -> SpanStack:
    """The budget, scheduler and sessions of a loaded span; `planned` None = "auto" (most of the memory the
    weights left free, minus room for activations)."""
    span = span_model.span
    span_token_bytes = span_model.bytes_per_block_token * span.length  # as caches count
    if planned is None:
        where = "cpu" if config.kv_offload else config.device  # the KV cache in host RAM: sized from it
        planned = auto_cache_bytes(free_bytes(where), model_config, config.max_batch_tokens)
        say(f"KV cache budget: {fmt(planned)} ({planned // span_token_bytes} token slots)")
    budget = KVBudget(planned, config.page_tokens)
    scheduler = Scheduler(
        span_model,
        max_batch_tokens=config.max_batch_tokens,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        batch_wait_s=batch_wait_s,
        max_memory_wait_s=config.admission_timeout_s,
    )
    sessions = SessionManager(
        config,
        budget,
        span_token_bytes,
        new_cache=lambda rows, length, blocks: span_model.new_cache(rows, length, budget, blocks),
        release=scheduler.release,
        memory_waiters=lambda: scheduler.memory_waiters,
    )
    return SpanStack(span_model, budget, scheduler, sessions)
