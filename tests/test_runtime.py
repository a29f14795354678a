"""Block runtime without a network: span loading reads only its blocks, outputs match the local model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from swarm.errors import ConfigError
from swarm.runtime import SpanModel, load_client_head, load_span
from swarm.runtime.checkpoint import block_of_key
from swarm.spans import Span


def test_span_reads_only_its_blocks(tiny_model_path):
    loaded = load_span(tiny_model_path("qwen3_moe"), Span(0, 2))
    assert loaded.keys_read and {block_of_key(k) for k in loaded.keys_read} == {0, 1}


def test_client_head_reads_no_block(tiny_model_path):
    head = load_client_head(tiny_model_path("llama"))
    assert head.keys_read and all(block_of_key(k) is None for k in head.keys_read)


def test_span_loads_with_other_blocks_shards_deleted(tiny_model_path, tmp_path):
    """The strongest check that other blocks are never read: their shards are gone."""
    source = tiny_model_path("llama")
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if block_of_key(k) in (0, 1)}
    removed = set(weight_map.values()) - needed
    assert removed, "the tiny checkpoint should have shards without blocks 0 and 1"
    for shard in removed:
        (copy / shard).unlink()
    load_span(copy, Span(0, 2))
    with pytest.raises(ConfigError, match="missing"):
        load_span(copy, Span(4, 6))


@pytest.mark.parametrize("family", FAMILIES + ("mixtral",))
def test_spans_chained_equal_full_model_logits(family, tiny_model_path):
    path = tiny_model_path(family)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    head = load_client_head(path)
    spans = [SpanModel(load_span(path, Span(a, b))) for a, b in ((0, 1), (1, 4), (4, 6))]
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = local(ids, attention_mask=mask).logits
        hidden = head.embed_tokens(ids)
        for span in spans:
            hidden = span(hidden, positions, mask.bool(), span.new_cache(2, 16))
        logits = head.lm_head(head.norm(hidden))
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)


def test_block_hashes_are_stable_and_distinct(tiny_model_path):
    path = tiny_model_path("llama")
    first, second = load_span(path, Span(0, 3)), load_span(path, Span(1, 3))
    assert first.block_hashes[1:] == second.block_hashes
    assert len(set(first.block_hashes)) == 3


def test_span_beyond_model_is_refused(tiny_model_path):
    with pytest.raises(ConfigError, match="only 6 blocks"):
        load_span(tiny_model_path("llama"), Span(4, 8))


def test_spans_loaded_side_by_side_in_threads_keep_their_dtypes(tiny_model_path):
    """Peers loading at once in one process (in-process swarms, a client beside them): transformers builds
    a model in a dtype through torch's process-wide default, so unguarded builds in two threads made one
    span's norms float32 inside a bfloat16 span (its first step then failed) and left the default wrong."""
    import threading

    path = tiny_model_path("llama")
    wrong: list[tuple] = []

    def load(dtype: torch.dtype) -> None:
        for _ in range(3):
            span = load_span(path, Span(0, 2), dtype=dtype)
            wrong.extend((dtype, n, p.dtype) for n, p in span.layers.named_parameters() if p.dtype != dtype)

    threads = [threading.Thread(target=load, args=(d,)) for d in (torch.bfloat16, torch.float32) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]
    assert torch.get_default_dtype() == torch.float32
