"""The CUDA-graph decode path (swarm.runtime.graphs) gives what the eager path gives.

On the CPU the graph step runs unrecorded (`capture=False`): the same static buffers, `index_copy_`
writes and full-capacity masked attention as the recorded graph, so its arithmetic is tested here in
float32 for a dense, a sliding-window and a q/k-norm family, with padding and cache growth. With CUDA
the graph is really recorded and replayed (bfloat16, tolerance stated in the test); a mixture-of-experts
span cannot be recorded and falls back to eager with the same results.
"""

from __future__ import annotations

import pytest
import torch

from swarm.runtime import KVBudget, SpanModel, load_span
from swarm.runtime.graphs import DecodeGraphs
from swarm.runtime.span import Segment
from swarm.spans import Span

HIDDEN = 64
SPAN = Span(1, 4)


def steps(rows: int, prompt: int, decode: int, pad: int, seed: int = 0):
    """A prompt step (row 0 left-padded by `pad`) and `decode` single-token steps: (hidden, positions, valid)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(rows, prompt, dtype=torch.bool)
    valid[0, :pad] = False
    positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    out = [(torch.randn(rows, prompt, HIDDEN, generator=g), positions, valid)]
    last = positions[:, -1]
    for k in range(1, decode + 1):
        out.append((torch.randn(rows, 1, HIDDEN, generator=g), (last + k)[:, None], torch.ones(rows, 1, dtype=torch.bool)))
    return out


def run_steps(model: SpanModel, inputs, device="cpu", max_length=64):
    """The steps through one new session whose cache grows in pages of 16 slots (so it grows during them)."""
    cache = model.new_cache(inputs[0][0].shape[0], max_length, KVBudget(1 << 40, page_tokens=16))
    outs = []
    for h, p, v in inputs:
        cache.reserve(cache.length + h.shape[1])
        outs.append(model.run([Segment(cache, h.to(device, model.dtype), p, v)])[0].float().cpu())
    return outs


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 5), ("qwen3", None)])
def test_graph_step_equals_eager(tiny_model_path, family, window):
    path = tiny_model_path(family)
    eager = SpanModel(load_span(path, SPAN))
    graphed = SpanModel(load_span(path, SPAN))
    graphed.graphs = DecodeGraphs(graphed, capture=False)
    if window is not None:  # a window shorter than the session, so it cuts into the past
        eager.windows = graphed.windows = [window] * SPAN.length
    # 40 decode steps from a 6-token prompt: the cache grows from 16 slots to 48 (new tensors, new state;
    # the first step after each growth runs eagerly, since it reallocates the tensors)
    inputs = steps(rows=2, prompt=6, decode=40, pad=2)
    want = run_steps(eager, inputs)
    got = run_steps(graphed, inputs)
    assert graphed.graphs.recorded == 3 and graphed.graphs.replays == 40 - 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def poison_free_memory() -> None:
    """Leave NaN in the memory the CUDA caching allocator hands out next: unused cache slots must not matter."""
    garbage = torch.full((64 << 20,), float("nan"), device="cuda")
    del garbage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_recorded_graph_on_cuda(tiny_model_path, family):
    """bfloat16: graph vs eager outputs within 2e-2 (attention kernels differ: masked efficient attention
    over the capacity vs flash over the length). A mixture-of-experts span is recorded where its experts
    run without CPU syncs, and otherwise falls back to eager; the outputs agree either way."""
    path = tiny_model_path(family)
    eager = SpanModel(load_span(path, SPAN, dtype=torch.bfloat16, device="cuda"))
    graphed = SpanModel(load_span(path, SPAN, dtype=torch.bfloat16, device="cuda"), cuda_graphs=True)
    inputs = steps(rows=1, prompt=6, decode=20, pad=0)
    want = run_steps(eager, inputs, "cuda")
    run_steps(graphed, inputs, "cuda")  # a first session: its graphs are freed with its cache
    poison_free_memory()
    got = run_steps(graphed, inputs, "cuda")
    graphs = graphed.graphs
    if graphs.disabled:
        assert family == "qwen3_moe" and graphs.replays == 0, graphs.disabled
    else:
        assert graphs.recorded == 4 and graphs.replays == 2 * (20 - 1)  # 16 -> 32 slots: one re-record each
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_tokens_on_cuda_bf16(tiny_model_path):
    """The test prompts' greedy tokens in bfloat16 on the GPU: three sessions decoding together in one
    batched forward, and each alone (a lone decode step replays its CUDA graph), equal what local
    transformers generates in bfloat16 on the same GPU."""
    from transformers import AutoModelForCausalLM

    from swarm.runtime import load_client_head

    path = tiny_model_path("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    head = load_client_head(path, dtype=torch.bfloat16, device="cuda")
    model = SpanModel(load_span(path, Span(0, local.config.num_hidden_layers), dtype=torch.bfloat16, device="cuda"),
                      cuda_graphs=True)
    prompts = [[1, 17, 230, 45, 99, 4, 310, 7], [1, 5, 6, 7, 8], [1, 400, 3, 3, 250, 60]]
    new_tokens = 12
    expected = [local.generate(torch.tensor([p], device="cuda"), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]

    @torch.inference_mode()
    def greedy(sessions: list[list[int]]) -> list[list[int]]:
        caches = [model.new_cache(1, len(p) + new_tokens) for p in sessions]
        fed = [list(p) for p in sessions]
        out = [[] for _ in sessions]
        step_ids = [list(p) for p in sessions]
        for _ in range(new_tokens):
            segments = []
            for cache, ids, seen in zip(caches, step_ids, fed, strict=True):
                n = len(ids)
                cache.reserve(cache.length + n)
                hidden = head.embed_tokens(torch.tensor([ids], device="cuda")).cpu()
                positions = torch.arange(len(seen) - n, len(seen))[None]
                segments.append(Segment(cache, hidden, positions, torch.ones(1, n, dtype=torch.bool)))
            results = model.run(segments) if len(sessions) > 1 else [model.run([s])[0] for s in segments]
            for k, hidden in enumerate(results):
                token = int(head.lm_head(head.norm(hidden[:, -1:].to("cuda"))).argmax(-1))
                out[k].append(token)
                fed[k].append(token)
                step_ids[k] = [token]
        return out

    assert greedy(prompts) == expected  # batched: one forward per step for all three
    for p, want in zip(prompts, expected, strict=True):
        assert greedy([p]) == [want]  # alone: CUDA graph replays after the first steps
    assert model.graphs.replays > 0
