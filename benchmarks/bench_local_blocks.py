"""What `local_blocks=(k, k)` costs: a client that runs the first and last k blocks itself, so no peer sees
the embeddings' output or the final hidden states, against the same client with k = 0, same run.

Two `swarm peer` processes (client.launcher.LocalSwarm) on loopback serve half the model each; the client
routes the blocks it does not run itself through them (a sub-range of each peer's span). For each k in
--ks, and for local transformers, a warm-up and --repeats greedy generations without EOS; reported:
decode tokens/s (tokens 2..N over their time), time to first token (prefill of --prompt-tokens), and
the ratios against k = 0 and against local. The runs of each setting alternate with the others
(round-robin over repeats), so drift on a shared machine spreads over all of them. Tokens are checked
equal to local greedy in every run.

    python benchmarks/bench_local_blocks.py                                        # CPU, tiny Llama
    python benchmarks/bench_local_blocks.py --device cuda --dtype bfloat16 --llama8b   # GPU, Llama-3-8B shape
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_decode import (  # benchmarks/bench_decode.py, beside this file
    add_model_args,
    even_spans,
    finish_model_args,
    generate_timed,
    log,
    machine_info,
    model_info,
    prepare_model,
    run_benchmark,
)

from client.launcher import LocalSwarm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, threads_help="torch threads of each peer and of this process")
    p.add_argument("--ks", default="0,1,2", help="comma-separated k of local_blocks=(k, k); 0 is the baseline")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    finish_model_args(args)
    args.ks = [int(k) for k in args.ks.split(",")]
    if 0 not in args.ks:
        args.ks.insert(0, 0)
    return args


def one_run(model, prompt, new_tokens: int) -> tuple[list[int], dict]:
    tokens, stamps, start = generate_timed(model, prompt, new_tokens)
    return tokens, {"decode_tokens_s": (new_tokens - 1) / (stamps[-1] - stamps[1]), "first_token_s": stamps[1] - start}


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"runs": runs}


def run(args, work) -> dict:
    from client import ClientConfig, DistributedModelForCausalLM

    torch.set_num_threads(args.threads)
    model_path, local_model = prepare_model(args, work)
    config = local_model.config
    seeded = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, config.vocab_size, (1, args.prompt_tokens), generator=seeded).to(args.device)
    dtype = getattr(torch, args.dtype)
    result = {
        "benchmark": "local_blocks", "machine": machine_info(args.device), "model": model_info(config, model_path),
        "settings": {"dtype": args.dtype, "ks": args.ks, "new_tokens": args.new_tokens,
                     "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "peers": 2},
    }
    with LocalSwarm(str(model_path), startup_timeout_s=args.startup_timeout_s, peer_threads=args.threads) as swarm:
        swarm.start_peers(even_spans(config.num_hidden_layers, 2), extra=["--device", args.device, "--dtype", args.dtype])
        client_config = ClientConfig(initial_peers=tuple(swarm.initial_peers), wait_for_route_s=60)
        models = {"local": local_model}
        for k in args.ks:
            models[f"k={k}"] = DistributedModelForCausalLM.from_pretrained(
                model_path, client_config=client_config, dtype=dtype, device=args.device, local_blocks=(k, k))
        try:
            reference = None
            for name, model in models.items():  # warm-up; local first: its tokens are the reference
                log(f"{name}: warm-up")
                tokens, _ = one_run(model, prompt, args.new_tokens)
                reference = tokens if reference is None else reference
            runs: dict[str, list[dict]] = {name: [] for name in models}
            equal = {name: True for name in models}
            for r in range(args.repeats):
                for name, model in models.items():
                    tokens, figs = one_run(model, prompt, args.new_tokens)
                    equal[name] &= tokens == reference
                    runs[name].append(figs)
                    log(f"{name} #{r}: {figs['decode_tokens_s']:.1f} tokens/s, first token {figs['first_token_s']:.3f} s")
        finally:
            for name, model in models.items():
                if name != "local":
                    model.shutdown()
    settings = {name: medians(rs) | {"tokens_equal_local": equal[name]} for name, rs in runs.items()}
    base, local = settings["k=0"], settings["local"]
    summary = {}
    for k in args.ks:
        s = settings[f"k={k}"]
        summary[f"k={k}"] = {
            "decode_vs_k0": round(s["decode_tokens_s"] / base["decode_tokens_s"], 3),
            "first_token_vs_k0": round(s["first_token_s"] / base["first_token_s"], 3),
            "decode_vs_local": round(s["decode_tokens_s"] / local["decode_tokens_s"], 3),
            "tokens_equal_local": s["tokens_equal_local"],
        }
    result.update(settings=result["settings"], results=settings, summary=summary)
    return result


def main(argv=None) -> int:
    return run_benchmark(parse_args(argv), run, "bench_local_blocks.")


if __name__ == "__main__":
    sys.exit(main())
