"""CUDA graphs of batched decode steps (swarm.runtime.graphs) give what the eager path gives.

The graphs run the varlen flash-attention path, so these tests need CUDA (bfloat16; tolerance 2e-2 on
hidden states, stated in each test). Sessions without padding decode in batches of several sizes: each
batch replays the graph of its bucket of rows (spare rows idle on the pool's sink slot); the outputs
match the eager flash path and per-session SDPA. A mixture-of-experts span whose routing cannot be
captured falls back to eager with the same results. Unused pool slots full of NaN must not matter.
"""

from __future__ import annotations

import pytest
import torch

from swarm.runtime import SpanModel, load_span
from swarm.runtime.batch import Segment
from swarm.spans import Span

HIDDEN = 64
SPAN = Span(1, 4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def decode_rounds(sizes: list[int], prompt: int = 6, seed: int = 0):
    """Session k: a `prompt`-token prompt, then one token per round in which it takes part (the first
    sizes[j] sessions take part in round j); inputs as (session, hidden, positions, valid) per round."""
    g = torch.Generator().manual_seed(seed)
    sessions = max(sizes)
    rounds = [[(k, torch.randn(1, prompt, HIDDEN, generator=g), torch.arange(prompt)[None],
                torch.ones(1, prompt, dtype=torch.bool)) for k in range(sessions)]]
    at = [prompt] * sessions
    for size in sizes:
        step = []
        for k in range(size):
            step.append((k, torch.randn(1, 1, HIDDEN, generator=g), torch.tensor([[at[k]]]),
                         torch.ones(1, 1, dtype=torch.bool)))
            at[k] += 1
        rounds.append(step)
    return rounds


def run_rounds(model: SpanModel, rounds, together: bool) -> list[torch.Tensor]:
    """Every round's outputs in session order: one forward per round (`together`) or per step."""
    caches = [model.new_cache(1, 64) for _ in rounds[0]]
    outs = []
    for steps in rounds:
        segments = []
        for k, h, p, v in steps:
            caches[k].reserve(caches[k].length + h.shape[1])
            segments.append(Segment(caches[k], h.to("cuda", model.dtype), p, v))
        results = model.run(segments) if together else [model.run([s])[0] for s in segments]
        outs += [r.float().cpu() for r in results]
    for cache in caches:
        cache.free()
    return outs


def poison_free_memory() -> None:
    """Leave NaN in the memory the CUDA caching allocator hands out next: unused cache slots must not matter."""
    garbage = torch.full((64 << 20,), float("nan"), device="cuda")
    del garbage


@needs_cuda
@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 5), ("qwen3", None), ("qwen3_moe", None)])
def test_graph_batches_equal_eager_and_per_session_sdpa(tiny_model_path, family, window):
    """bfloat16: batches of 1, 3, 5 and 2 decode steps (buckets 1, 4, 8, 2) replay graphs whose outputs
    match the eager flash path and per-session SDPA within 2e-2; a window shorter than the sessions cuts
    into their past. A mixture-of-experts span is recorded where its experts run without CPU syncs and
    otherwise falls back to eager; the outputs agree either way."""
    path = tiny_model_path(family)

    def model(**kwargs) -> SpanModel:
        m = SpanModel(load_span(path, SPAN, dtype=torch.bfloat16, device="cuda"), **kwargs)
        if window is not None:
            m.windows = [window] * SPAN.length
        return m

    rounds = decode_rounds([1, 3, 5, 2, 5, 1])
    graphed = model(cuda_graphs=True)
    run_rounds(graphed, rounds, together=True)  # a first pass: its sessions are gone, the graphs stay
    poison_free_memory()
    got = run_rounds(graphed, rounds, together=True)
    eager = run_rounds(model(), rounds, together=True)
    sdpa = run_rounds(model(flash=False), rounds, together=False)
    graphs = graphed.graphs
    if graphs.disabled:
        assert family == "qwen3_moe" and graphs.replays == 0, graphs.disabled
    else:
        assert graphs.replays == 2 * 6 and graphs.recorded == len({1, 4, 8, 2})  # re-recorded only if the pool moved
    for a, b, c in zip(got, eager, sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_padded_sessions_and_prompts_run_eagerly(tiny_model_path):
    """Only single-token steps of sessions without padding replay graphs: a padded session's prompt and
    decode steps run eagerly."""
    model = SpanModel(load_span(tiny_model_path("llama"), SPAN, dtype=torch.bfloat16, device="cuda"),
                      cuda_graphs=True)
    padded = model.new_cache(2, 32)
    padded.reserve(4)
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    model.run([Segment(padded, torch.randn(2, 4, HIDDEN).to("cuda", torch.bfloat16), torch.zeros(2, 4, dtype=torch.long),
                       valid)])
    padded.reserve(5)
    model.run([Segment(padded, torch.randn(2, 1, HIDDEN).to("cuda", torch.bfloat16), torch.tensor([[3], [4]]),
                       torch.ones(2, 1, dtype=torch.bool))])
    assert model.graphs.replays == 0 and model.graphs.recorded == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_tokens_on_cuda_bf16(tiny_model_path):
    """The test prompts' greedy tokens in bfloat16 on the GPU: three sessions decoding together in one
    batched forward, and each alone (decode steps replay the graphs of buckets 4 and 1), equal what local
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
