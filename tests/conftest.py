"""Shared fixtures: tiny models of real architectures (swarm.tiny), built once per test session."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/localswarm.py, shared by tests and benchmarks

from swarm.tiny import make_tiny_model

# The exactness matrix (DESIGN.md section 6): every route test runs over these families. qwen3_moe is
# the MoE member because its tiny model alternates dense and sparse layers (decoder_sparse_step=2),
# which also catches a runtime that builds a block with its index inside the span, not its global one.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A function `(family, num_layers=6) -> Path` of a tiny checkpoint (seed 0) with its tokenizer.

    Each (family, num_layers) is built once per session under pytest's temporary folder; tests must
    treat the folder as read-only, since other tests share it.
    """
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, num_layers: int = 6) -> Path:
        key = (family, num_layers)
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"tiny-{family}-{num_layers}")
            built[key] = make_tiny_model(family, out_dir, num_layers=num_layers)
        return built[key]

    return get


@pytest.fixture(scope="session")
def inprocess_swarm():
    """One in-process swarm (bootstrap + whatever peers tests start) shared by the whole session."""
    from localswarm import InProcessSwarm

    swarm = InProcessSwarm()
    try:
        yield swarm
    finally:
        swarm.close()
