"""Lower-precision and offloaded spans against the dtype's own (bf16 on a GPU), in one process, same run:
memory per block, decode speed at 1 and 32 sessions, and divergence from the dtype's outputs.

Variants (--variants), each a SpanModel over blocks [0, --blocks) loaded as `swarm peer` would with the
matching flags: `none` (the baseline: --dtype, no quantization), `int8`, `fp8`, `nf4` (--quant), `kv-fp8`
(--kv-dtype fp8), `offload` (--offload-blocks, half the span), `kv-host` (--kv-offload). One variant is
on the device at a time (the baseline first); the figures of each are taken against the baseline's.

Figures per variant:
  * memory: device weight bytes per block as planned (swarm.runtime.loading.span_memory: what peer.memory
    chooses blocks with) and as measured once loaded (CUDA memory_allocated, or the tensors' bytes on the
    CPU); blocks of weights per GiB; blocks that fit --budget-gib with a KV reserve of --kv-tokens per
    block (peer.memory.blocks_that_fit); KV bytes per cached token per block;
  * speed: for each B in --sessions, B sessions (batch 1) prefill --prompt-tokens, then --steps decode
    steps in which all B sessions' tokens run as one forward (as the peer's scheduler batches them), each
    timed to a synchronize; median forward ms, tokens/s (B / forward), and the ratio to the baseline's;
    CUDA graphs as a peer runs them (--no-cuda-graphs to turn off), with the reason when a capture failed;
  * divergence (with the model's own embeddings, final norm and head around the span, so over the whole
    model when --blocks is all of them): per-block relative L2 error of the hidden states of the prompt
    (each variant fed its own previous block's output, so errors accumulate as in a route); greedy
    decoding of --greedy-tokens tokens (the first position where the tokens differ from the baseline's)
    and, teacher-forced on the baseline's greedy sequence, the share of positions whose top-1 token
    agrees, and the logits' mean relative L2 error.

Random weights (a built checkpoint) are not trained ones: their divergence says how the schemes round,
not how a trained model's quality changes; perplexity needs a pretrained model, which no installed
package ships (`perplexity` is null).

    python benchmarks/bench_quant.py                                   # CPU smoke: tiny Llama, 2 sessions
    python benchmarks/bench_quant.py --device cuda --dtype bfloat16 --llama8b --work-dir /tmp/b8
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import bench_decode  # benchmarks/bench_decode.py, beside this file
import torch
from bench_decode import add_model_args, finish_model_args, machine_info, model_info, prepare_model

from peer.memory import blocks_that_fit
from swarm.runtime import SpanModel, load_span
from swarm.runtime import quant as q
from swarm.runtime.batch import Segment
from swarm.runtime.loading import block_weight_bytes, span_memory
from swarm.spans import Span

GiB = 1 << 30
VARIANTS = ("none", "int8", "fp8", "nf4", "kv-fp8", "offload", "kv-host")


def log(message: str) -> None:
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


bench_decode.log = log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--blocks", type=int, help="serve blocks [0, N) (default: all)")
    p.add_argument("--sessions", help="comma-separated session counts (default 1,32; CPU: 1,2)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per session count")
    p.add_argument("--greedy-tokens", type=int, help="greedy tokens compared (default 256; CPU: 32)")
    p.add_argument("--budget-gib", type=float, default=24.0,
                   help="device memory of the blocks-that-fit figure")
    p.add_argument("--kv-tokens", type=int, default=8192,
                   help="KV reserve per block of that figure, in tokens")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    add_model_args(p, threads_help="torch CPU threads")
    args = p.parse_args(argv)
    finish_model_args(args)
    cpu = args.device == "cpu"
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}")
    if "none" not in args.variants:
        args.variants.insert(0, "none")
    args.variants.sort(key=lambda v: v != "none")  # the baseline first
    args.sessions = [int(b) for b in (args.sessions or ("1,2" if cpu else "1,32")).split(",")]
    args.greedy_tokens = args.greedy_tokens or (32 if cpu else 256)
    if cpu:
        args.prompt_tokens = min(args.prompt_tokens, 32)
    return args


def settings(variant: str, span: Span) -> tuple[dict, dict]:
    """(load_span keywords, SpanModel keywords) of a variant: what the peer flags set."""
    if variant in ("int8", "fp8", "nf4"):
        return {"quant": variant}, {}
    return {
        "none": ({}, {}), "kv-fp8": ({}, {"kv_dtype": "fp8"}),
        "offload": ({"offload_blocks": span.length // 2}, {}), "kv-host": ({}, {"kv_offload": True}),
    }[variant]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated(torch.device(device)) if device.startswith("cuda") else 0


def memory_figures(path, span: Span, dtype, load_kw: dict, model_kw: dict, args) -> dict:
    """What the planner counts for this variant (before loading)."""
    quant, offload = load_kw.get("quant", "none"), load_kw.get("offload_blocks", 0)
    planned = span_memory(path, span, dtype, quant, model_kw.get("kv_dtype"), offload)
    weights = block_weight_bytes(path, dtype, quant)
    kv_block_token = planned.kv_bytes_per_token // span.length
    on_device_kv = 0 if model_kw.get("kv_offload") else kv_block_token * args.kv_tokens
    per_block = statistics.mean(weights)
    # as peer.memory.blocks_to_take counts: offloaded blocks need two blocks' staging on the device, no more
    staging = sum(sorted(weights, reverse=True)[:2]) if offload else 0
    fit = blocks_that_fit(int(args.budget_gib * GiB), weights, on_device_kv, staging)
    return {
        "planned_device_weight_bytes": planned.weights_bytes, "planned_host_weight_bytes": planned.host_bytes,
        "weight_bytes_per_block": round(per_block), "blocks_per_gib": round(GiB / per_block, 2),
        "kv_bytes_per_block_token": kv_block_token,
        "blocks_fit_budget": min(fit + offload, len(weights)),
    }


def load_variant(path, span: Span, dtype, load_kw: dict, model_kw: dict, args) -> tuple[SpanModel, dict]:
    sync(args.device)
    before, start = allocated(args.device), time.perf_counter()
    loaded = load_span(path, span, dtype=dtype, device=args.device, **load_kw)
    model = SpanModel(loaded, cuda_graphs=args.cuda_graphs and args.device.startswith("cuda"), **model_kw)
    sync(args.device)
    if args.device.startswith("cuda"):
        measured = allocated(args.device) - before - sum(  # the rotary tables are not block weights
            t.numel() * t.element_size() for t in model.rotary_emb.buffers())
    else:
        measured = sum(q.tensor_bytes(p) for p in loaded.layers.parameters())
        if model.host_blocks is not None:
            measured -= model.host_blocks.host_bytes  # on the CPU they are "device" bytes too
    return model, {"load_s": round(time.perf_counter() - start, 2), "measured_device_weight_bytes": measured}


def model_forwards(args) -> int:
    """Forwards decode_speed runs for all session counts (prefills and steps, warm-up included)."""
    return sum(2 * b + 4 + args.steps for b in args.sessions)


def decode_speed(model: SpanModel, sessions: int, args, hidden_size: int) -> dict:
    """Median forward time of `args.steps` decode steps of `sessions` sessions batched (after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    n = args.prompt_tokens
    times = []
    for phase, steps in (("warm-up", 4), ("timed", args.steps)):
        caches = [model.new_cache(1, n + steps) for _ in range(sessions)]
        for cache in caches:
            cache.reserve(n)
            model.run([Segment(cache, torch.randn(1, n, hidden_size, generator=g), torch.arange(n)[None],
                               torch.ones(1, n, dtype=torch.bool))])
        for k in range(steps):
            segments = []
            for cache in caches:
                cache.reserve(n + k + 1)
                segments.append(Segment(cache, torch.randn(1, 1, hidden_size, generator=g),
                                        torch.tensor([[n + k]]), torch.ones(1, 1, dtype=torch.bool)))
            sync(args.device)
            start = time.perf_counter()
            model.run_packed(segments)
            sync(args.device)
            if phase == "timed":
                times.append(time.perf_counter() - start)
        for cache in caches:
            cache.free()
    ms = statistics.median(times) * 1e3
    return {"forward_ms_median": round(ms, 3), "tokens_s": round(sessions * 1e3 / ms, 1)}


class Ends:
    """The model's embeddings, final norm and head (from the local reference model) around a span."""

    def __init__(self, local):
        self.embed, self.norm, self.head = local.model.embed_tokens, local.model.norm, local.lm_head

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)).float()


@torch.inference_mode()
def per_block_hidden(model: SpanModel, hidden: torch.Tensor) -> list[torch.Tensor]:
    """The prompt's hidden states after each block, each block fed the previous one's output (CPU, fp32)."""
    n, out = hidden.shape[1], []
    for block in range(model.span.start, model.span.end):
        cache = model.new_cache(1, n, blocks=(block, block + 1))
        cache.reserve(n)
        valid = torch.ones(1, n, dtype=torch.bool)
        hidden = model.run([Segment(cache, hidden, torch.arange(n)[None], valid)])[0]
        cache.free()
        out.append(hidden.float().cpu())
    return out


@torch.inference_mode()
def greedy(model: SpanModel, ends: Ends, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    n = prompt.shape[1]
    cache = model.new_cache(1, n + new_tokens)
    cache.reserve(n)
    valid = torch.ones(1, n, dtype=torch.bool)
    hidden = model.run([Segment(cache, ends.embed(prompt), torch.arange(n)[None], valid)])[0]
    tokens = []
    for k in range(new_tokens):
        tokens.append(int(ends.logits(hidden[:, -1:]).argmax(-1)))
        if k == new_tokens - 1:
            break
        cache.reserve(n + k + 1)
        ids = torch.tensor([[tokens[-1]]], device=prompt.device)
        hidden = model.run([Segment(cache, ends.embed(ids), torch.tensor([[n + k]]),
                                    torch.ones(1, 1, dtype=torch.bool))])[0]
    cache.free()
    return tokens


@torch.inference_mode()
def teacher_forced_logits(model: SpanModel, ends: Ends, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `ids` in one prefill ([len, vocab], CPU)."""
    n = ids.shape[1]
    cache = model.new_cache(1, n)
    cache.reserve(n)
    valid = torch.ones(1, n, dtype=torch.bool)
    hidden = model.run([Segment(cache, ends.embed(ids), torch.arange(n)[None], valid)])[0]
    cache.free()
    return ends.logits(hidden)[0].cpu()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def divergence(model: SpanModel, ends: Ends, prompt, reference: dict, args) -> dict:
    hidden = per_block_hidden(model, ends.embed(prompt))
    layers = [round(rel_l2(h, r), 6) for h, r in zip(hidden, reference["hidden"], strict=True)]
    figures = {"hidden_rel_l2_per_block": layers, "hidden_rel_l2_last": layers[-1]}
    if not reference.get("tokens"):
        return figures
    tokens = greedy(model, ends, prompt, args.greedy_tokens)
    differ = [i for i, (a, b) in enumerate(zip(tokens, reference["tokens"], strict=True)) if a != b]
    logits = teacher_forced_logits(model, ends, reference["sequence"])
    p = prompt.shape[1]
    forced = logits[p - 1 : -1]  # the predictions of the baseline's greedy tokens
    top1 = (forced.argmax(-1) == reference["logits"][p - 1 : -1].argmax(-1)).float().mean().item()
    errors = [rel_l2(a, b) for a, b in zip(forced, reference["logits"][p - 1 : -1], strict=True)]
    return figures | {
        "greedy_first_difference": differ[0] if differ else None,
        "greedy_equal_tokens": len(tokens) - len(differ),
        "teacher_forced_top1_agreement": round(top1, 4),
        "teacher_forced_logits_rel_l2_mean": round(statistics.mean(errors), 5),
        "teacher_forced_logits_rel_l2_max": round(max(errors), 5),
    }


def run(args, work) -> dict:
    torch.set_num_threads(args.threads)
    path, local = prepare_model(args, work)
    config = local.config
    local.model.layers = torch.nn.ModuleList()  # only the ends stay on the device; blocks come per variant
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    ends = Ends(local)
    span = Span(0, args.blocks or config.num_hidden_layers)
    dtype = getattr(torch, args.dtype)
    whole = span.length == config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, config.vocab_size, (1, args.prompt_tokens), generator=g).to(args.device)
    result = {
        "benchmark": "quant", "machine": machine_info(args.device), "model": model_info(config, path),
        "span": str(span),
        "settings": {"dtype": args.dtype, "variants": args.variants, "sessions": args.sessions,
                     "prompt_tokens": args.prompt_tokens, "steps": args.steps,
                     "greedy_tokens": args.greedy_tokens, "budget_gib": args.budget_gib,
                     "kv_tokens": args.kv_tokens,
                     "cuda_graphs": args.cuda_graphs and args.device.startswith("cuda")},
        "perplexity": None, "perplexity_note": "needs a pretrained model; none is available offline here",
        "variants": {},
    }
    reference: dict = {}
    with torch.inference_mode():
        for variant in args.variants:
            result["variants"][variant] = measure_variant(variant, path, span, dtype, ends, prompt, reference,
                                                          args, config, whole)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    result["summary"] = summarize(result["variants"], args.sessions)
    return result


def measure_variant(variant: str, path, span: Span, dtype, ends: Ends, prompt, reference: dict, args, config,
                    whole: bool) -> dict:
    """Every figure of one variant (the baseline's outputs go into `reference` for the others)."""
    load_kw, model_kw = settings(variant, span)
    figures = {"load_span": load_kw, "span_model": model_kw} | memory_figures(path, span, dtype, load_kw,
                                                                             model_kw, args)
    log(f"{variant}: loading ({figures['weight_bytes_per_block'] / 2**20:.1f} MiB a block planned)")
    model, loaded = load_variant(path, span, dtype, load_kw, model_kw, args)
    figures |= loaded
    for sessions in args.sessions:
        figures[f"decode_{sessions}"] = decode_speed(model, sessions, args, config.hidden_size)
        log(f"{variant}: {sessions} sessions: {figures[f'decode_{sessions}']}")
    if model.host_blocks is not None:  # its two staging sets, made at the first forward
        figures["measured_device_weight_bytes"] += model.host_blocks.staging_bytes
        figures["host_to_device_bytes_per_forward"] = model.host_blocks.copied_bytes // model_forwards(args)
    if model.graphs is not None:
        figures["cuda_graphs"] = {"replays": model.graphs.replays, "disabled": model.graphs.disabled}
    if variant == "none":
        reference["hidden"] = per_block_hidden(model, ends.embed(prompt))
        if whole:  # greedy figures only over the whole model (the ends need every block)
            reference["tokens"] = greedy(model, ends, prompt, args.greedy_tokens)
            greedy_ids = torch.tensor([reference["tokens"]], device=args.device)
            reference["sequence"] = torch.cat([prompt, greedy_ids], 1)
            reference["logits"] = teacher_forced_logits(model, ends, reference["sequence"])
    else:
        figures |= divergence(model, ends, prompt, reference, args)
        log(f"{variant}: last block's hidden-state error {figures['hidden_rel_l2_last']:.4g}")
    return figures


def summarize(variants: dict, sessions: list[int]) -> dict:
    """Per variant, its figures against the baseline's (`none`) of the same run."""
    base = variants["none"]
    out = {}
    for name, v in variants.items():
        row = {"blocks_per_gib": v["blocks_per_gib"],
               "blocks_per_gib_vs_none": round(v["blocks_per_gib"] / base["blocks_per_gib"], 3),
               "blocks_fit_budget": v["blocks_fit_budget"],
               "measured_over_planned_bytes": round(v["measured_device_weight_bytes"]
                                                    / max(v["planned_device_weight_bytes"], 1), 4)}
        for b in sessions:
            row[f"tokens_s_{b}"] = v[f"decode_{b}"]["tokens_s"]
            ratio = v[f"decode_{b}"]["tokens_s"] / base[f"decode_{b}"]["tokens_s"]
            row[f"tokens_s_{b}_vs_none"] = round(ratio, 3)
        for key in ("hidden_rel_l2_last", "greedy_first_difference", "teacher_forced_top1_agreement"):
            if key in v:
                row[key] = v[key]
        out[name] = row
    return out


def main(argv=None) -> int:
    return bench_decode.run_benchmark(parse_args(argv), run, "bench_quant.")


if __name__ == "__main__":
    sys.exit(main())
