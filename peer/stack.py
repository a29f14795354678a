"""What serves one loaded span: its KV budget, scheduler and session manager, built together so that a
peer that moves (peer.rebalance) swaps all of them at once. Also the memory plan checked before loading.

Mutates nothing; `plan_memory` raises ConfigError when the span and its KV budget do not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.runtime import KVBudget, SpanModel
from swarm.runtime.loading import span_memory
from swarm.spans import Span

from peer.config import PeerConfig
from peer.memory import auto_cache_bytes, check_fits, describe, fmt, free_bytes
from peer.scheduler import Scheduler
from peer.sessions import SessionManager


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
    memory = span_memory(config.model_path, span, dtype)
    free = free_bytes(config.device)
    planned = config.cache_bytes if isinstance(config.cache_bytes, int) else None
    if planned is None and config.cache_bytes != "auto":
        planned = memory.kv_bytes(config.cache_tokens)
    say(f"loading {model_id}: {describe(memory, span, planned, config.device, free)}")
    check_fits(memory, span, planned or 0, config.device, free)
    return planned


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
        planned = auto_cache_bytes(free_bytes(config.device), model_config, config.max_batch_tokens)
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
