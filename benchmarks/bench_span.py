"""A peer's compute alone: batched decode steps of one span, per-session SDPA vs one varlen flash call
per block vs CUDA graphs, in one process, same run.

No network and no scheduler: SpanModel on the checkpoint's blocks [0, --blocks), for each count B of
--sessions: B sessions (batch 1 each) take a --prompt-tokens prefill, then --steps decode steps in which
all B sessions' single-token steps run as one forward, timed one by one (a synchronize after each). The
same inputs go through `per_session_sdpa` (attention per session, eager; the path before the KV pool),
`eager` (the pool's varlen flash attention on CUDA; on the CPU the same as per-session SDPA) and
`cuda_graphs` (CUDA); the graph model's warm-up steps (recording) are left out of its figures. Also: the
largest difference of the outputs (hidden states, bf16) between eager and graphs, the tolerance our CUDA
tests use being 2e-2.

    python benchmarks/bench_span.py --device cuda --dtype bfloat16 --llama8b --work-dir /tmp/b8 --blocks 16 \
        --sessions 1,8,32,64
    python benchmarks/bench_span.py                # CPU, tiny Llama: eager only (flash and graphs are CUDA only)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bench_decode  # benchmarks/bench_decode.py, beside this file
import torch
from bench_decode import add_model_args, finish_model_args, machine_info, prepare_model

from swarm.runtime import SpanModel, load_span
from swarm.runtime.batch import Segment
from swarm.spans import Span


def log(message: str) -> None:
    print(f"[bench_span {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


bench_decode.log = log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, help="serve blocks [0, N) (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    p.add_argument("--sessions", default="1", help="comma-separated session counts B (default 1)")
    add_model_args(p, threads_help="torch CPU threads")
    args = p.parse_args(argv)
    finish_model_args(args)
    args.sessions = [int(b) for b in args.sessions.split(",")]
    return args


def timed_decode(model: SpanModel, sessions: int, prompt, steps, device: str) -> tuple[list[float], list[torch.Tensor]]:
    """Per-forward seconds of `steps` (each: every session's step in one forward) after each session's
    prefill of `prompt`, and every forward's outputs (on the CPU)."""
    caches = [model.new_cache(1, prompt[0].shape[1] + len(steps)) for _ in range(sessions)]
    for cache in caches:
        cache.reserve(prompt[0].shape[1])
        model.run([Segment(cache, *prompt)])
    outs, times = [], []
    for h, p, v in steps:
        segments = []
        for cache in caches:
            cache.reserve(cache.length + 1)
            segments.append(Segment(cache, h, p, v))
        start = time.perf_counter()
        out = model.run_packed(segments)  # [sessions, hidden]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        outs.append(out.float().cpu())
    for cache in caches:
        cache.free()
    return times, outs


def run(args, work) -> dict:
    torch.set_num_threads(args.threads)
    path, local = prepare_model(args, work)
    config = local.config
    del local
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    span = Span(0, args.blocks or config.num_hidden_layers)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n = args.prompt_tokens
    prompt = (torch.randn(1, n, config.hidden_size, generator=g).to(dtype), torch.arange(n)[None],
              torch.ones(1, n, dtype=torch.bool))
    steps = [(torch.randn(1, 1, config.hidden_size, generator=g).to(dtype), torch.tensor([[n + k]]),
              torch.ones(1, 1, dtype=torch.bool)) for k in range(args.steps)]
    result = {"benchmark": "span", "machine": machine_info(args.device), "span": str(span),
              "settings": {"dtype": args.dtype, "prompt_tokens": n, "steps": args.steps, "sessions": args.sessions}}

    def load(**kwargs) -> SpanModel:
        return SpanModel(load_span(path, span, dtype=dtype, device=args.device), **kwargs)

    variants = {"eager": load()}
    if args.device.startswith("cuda"):
        variants["per_session_sdpa"] = load(flash=False)
        variants["cuda_graphs"] = load(cuda_graphs=True)
    result["by_sessions"] = {}
    for sessions in args.sessions:
        figures, outputs = {}, {}
        for name, model in variants.items():
            timed_decode(model, sessions, prompt, steps[:4], args.device)  # warm-up: kernels, allocator, recording
            times, outputs[name] = timed_decode(model, sessions, prompt, steps, args.device)
            ms = sorted(t * 1000 for t in times)
            median = statistics.median(ms)
            figures[name] = {"forward_ms_median": round(median, 3), "forward_ms_max": round(ms[-1], 3),
                             "forward_ms_min": round(ms[0], 3), "tokens_s": round(sessions * 1000 / median, 1)}
            if model.graphs is not None:
                figures[name].update(recorded=model.graphs.recorded, replays=model.graphs.replays,
                                     record_ms_mean=round(model.graphs.record_s * 1000 / max(model.graphs.recorded, 1), 2),
                                     disabled=model.graphs.disabled)
            log(f"B={sessions} {name}: {figures[name]}")
        if "cuda_graphs" in figures:
            figures["graphs_over_eager"] = round(figures["eager"]["forward_ms_median"]
                                                 / figures["cuda_graphs"]["forward_ms_median"], 3)
            figures["graphs_over_per_session_sdpa"] = round(figures["per_session_sdpa"]["forward_ms_median"]
                                                            / figures["cuda_graphs"]["forward_ms_median"], 3)
            diffs = [(a - b).abs().max().item() for a, b in zip(outputs["eager"], outputs["cuda_graphs"], strict=True)]
            figures["max_abs_diff_hidden"] = round(max(diffs), 5)
            figures["max_abs_hidden"] = round(max(o.abs().max().item() for o in outputs["eager"]), 3)
        result["by_sessions"][sessions] = figures
    return result


def main(argv=None) -> int:
    return bench_decode.run_benchmark(parse_args(argv), run, "bench_span.")


if __name__ == "__main__":
    sys.exit(main())
