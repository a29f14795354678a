"""A peer's compute alone: one span's decode step, eager against CUDA graphs, in one process, same run.

No network and no scheduler: SpanModel on the checkpoint's blocks [0, --blocks), one session (batch 1),
a --prompt-tokens prefill, then --steps single-token decode steps timed one by one (a synchronize after
each). The same inputs go through an eager SpanModel and one with CUDA graphs; the graph model's first
steps (recording) are reported apart from its replays. Also: the largest difference of the outputs
(hidden states, bf16) between the two paths, the tolerance our CUDA tests use being 2e-2.

    python benchmarks/bench_span.py --device cuda --dtype bfloat16 --llama8b --work-dir /tmp/b8 --blocks 16
    python benchmarks/bench_span.py                # CPU, tiny Llama: eager only (graphs are CUDA only)
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
from swarm.runtime.span import Segment
from swarm.spans import Span


def log(message: str) -> None:
    print(f"[bench_span {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


bench_decode.log = log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, help="serve blocks [0, N) (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    add_model_args(p, threads_help="torch CPU threads")
    args = p.parse_args(argv)
    finish_model_args(args)
    return args


def timed_decode(model: SpanModel, prompt, steps, device: str) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step seconds of `steps` after a prefill of `prompt`, and every step's output (on the CPU)."""
    cache = model.new_cache(1, prompt[0].shape[1] + len(steps))
    outs, times = [], []
    for i, (h, p, v) in enumerate([prompt, *steps]):
        cache.reserve(cache.length + h.shape[1])
        start = time.perf_counter()
        out = model.run([Segment(cache, h, p, v)])[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        outs.append(out.float().cpu())
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
              "settings": {"dtype": args.dtype, "prompt_tokens": n, "steps": args.steps}}
    loaded = load_span(path, span, dtype=dtype, device=args.device)
    variants = {"eager": SpanModel(loaded)}
    if args.device.startswith("cuda"):
        variants["cuda_graphs"] = SpanModel(load_span(path, span, dtype=dtype, device=args.device), cuda_graphs=True)
    outputs = {}
    for name, model in variants.items():
        timed_decode(model, prompt, steps[:4], args.device)  # warm-up: kernels, allocator, a first recording
        times, outputs[name] = timed_decode(model, prompt, steps, args.device)
        ms = sorted(t * 1000 for t in times)
        result[name] = {"step_ms_median": round(statistics.median(ms), 3), "step_ms_max": round(ms[-1], 3),
                        "step_ms_min": round(ms[0], 3)}
        if model.graphs is not None:
            result[name].update(recorded=model.graphs.recorded, replays=model.graphs.replays,
                                record_ms_mean=round(model.graphs.record_s * 1000 / max(model.graphs.recorded, 1), 2),
                                disabled=model.graphs.disabled)
        log(f"{name}: {result[name]}")
    if "cuda_graphs" in result:
        result["graphs_speedup"] = round(result["eager"]["step_ms_median"] / result["cuda_graphs"]["step_ms_median"], 3)
        diffs = [(a - b).abs().max().item() for a, b in zip(outputs["eager"], outputs["cuda_graphs"], strict=True)]
        scale = max(o.abs().max().item() for o in outputs["eager"])
        result["max_abs_diff_hidden"] = round(max(diffs), 5)
        result["max_abs_hidden"] = round(scale, 3)
    return result


def main(argv=None) -> int:
    return bench_decode.run_benchmark(parse_args(argv), run, "bench_span.")


if __name__ == "__main__":
    sys.exit(main())
