"""What verification of results costs, and how long a lying peer lasts (client.verify), in one run.

Part 1, cost: four `swarm peer` processes on loopback (client.launcher.LocalSwarm), two replicas of each
half of the model, so every hop has a second peer to check it against. Clients with
verify_probability = 0 (no checks: the baseline), the default (0.05) and 1.0 (every step) generate the
same greedy tokens, round-robin over --repeats after a warm-up (which also runs each peer's forced
first check); reported: decode tokens/s, time to first token, their ratios against no checks, the checks
run and tokens compared, and whether the tokens equal local transformers'.

Part 2, steps until a liar is caught, against the bound derived in client.verify:
  * simulated: --trials seeded trials of the very schedule the client draws (client.verify.simulate_catch)
    per (q, N): lying with probability q per step after N honest steps; mean, quantiles and the tail
    P(T > n) at the bound's 95 % / 99 % points, against expected_steps / tail_bound;
  * real: --real-trials generations through in-process peers (tests/localswarm.py) where a full-span
    peer lies (tests/liar.py); each trial's steps until the drawn check that caught it, and whether the
    output still equals local transformers'.

    python benchmarks/bench_verify.py                                    # CPU, tiny Llama
    python benchmarks/bench_verify.py --device cuda --dtype bfloat16     # GPU machine
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

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
from client.verify import expected_steps, simulate_catch, steps_to_catch, tail_bound

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # localswarm.py, liar.py


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, threads_help="torch threads of each peer and of this process")
    p.add_argument("--probabilities", default="0,0.05,1", help="verify_probability values; 0 is the baseline")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials", type=int, default=20000, help="simulated trials per (q, N)")
    p.add_argument("--real-trials", type=int, default=6, help="generations with a lying in-process peer")
    p.add_argument("--real-p", type=float, default=0.05, help="verify_probability of the real trials")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    finish_model_args(args)
    args.probabilities = [float(x) for x in args.probabilities.split(",")]
    if 0.0 not in args.probabilities:
        args.probabilities.insert(0, 0.0)
    return args


def cost(args, model_path, local_model, prompt) -> dict:
    from client import ClientConfig, DistributedModelForCausalLM

    config = local_model.config
    dtype = getattr(torch, args.dtype)
    with LocalSwarm(str(model_path), startup_timeout_s=args.startup_timeout_s,
                    peer_threads=args.threads) as swarm:
        spans = even_spans(config.num_hidden_layers, 2)
        swarm.start_peers(spans * 2, extra=["--device", args.device, "--dtype", args.dtype])
        models = {}
        for p in args.probabilities:
            client_config = ClientConfig(initial_peers=tuple(swarm.initial_peers), wait_for_route_s=60,
                                         verify_probability=p, verify_seed=0)
            models[f"p={p:g}"] = DistributedModelForCausalLM.from_pretrained(
                model_path, client_config=client_config, dtype=dtype, device=args.device)
        try:
            reference, _, _ = generate_timed(local_model, prompt, args.new_tokens)
            for name, model in models.items():
                log(f"{name}: warm-up")
                generate_timed(model, prompt, args.new_tokens)
            runs = {name: [] for name in models}
            equal = dict.fromkeys(models, True)
            before = {name: _counters(model) for name, model in models.items()}
            for r in range(args.repeats):
                for name, model in models.items():
                    tokens, stamps, start = generate_timed(model, prompt, args.new_tokens)
                    equal[name] &= tokens == reference
                    figs = {"decode_tokens_s": (args.new_tokens - 1) / (stamps[-1] - stamps[1]),
                            "first_token_s": stamps[1] - start}
                    runs[name].append(figs)
                    log(f"{name} #{r}: {figs['decode_tokens_s']:.1f} tokens/s, "
                        f"first token {figs['first_token_s']:.3f} s")
            after = {name: _counters(model) for name, model in models.items()}
        finally:
            for model in models.values():
                model.shutdown()
    results = {}
    base = None
    for name, rs in runs.items():
        s = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        base = base or s
        per_run = {k: (after[name][k] - before[name][k]) / args.repeats for k in after[name]}
        results[name] = s | {
            "decode_vs_none": round(s["decode_tokens_s"] / base["decode_tokens_s"], 3),
            "first_token_vs_none": round(s["first_token_s"] / base["first_token_s"], 3),
            "checks_per_call": per_run["checks"], "compared_tokens_per_call": per_run["compared_tokens"],
            "convicted": after[name]["convicted"], "tokens_equal_local": equal[name], "runs": rs,
        }
    return {"peers": 4, "spans": spans * 2, "results": results}


def _counters(model) -> dict:
    s = model.verify_stats
    return {"checks": s.checks, "compared_tokens": s.compared_tokens, "convicted": len(s.convicted)}


def simulated(args) -> dict:
    p = 0.05
    out = {}
    for q, honest in ((1.0, 0), (1.0, 20), (0.3, 0), (0.05, 0), (0.3, 20)):
        rng = random.Random(hash((q, honest)) & 0xFFFF)
        caught = sorted(simulate_catch(p, q, honest, rng) for _ in range(args.trials))
        n95, n99 = steps_to_catch(p, 0.95, q, honest), steps_to_catch(p, 0.99, q, honest)
        out[f"q={q:g},N={honest}"] = {
            "p": p, "q": q, "honest_steps": honest, "trials": args.trials,
            "mean_steps": round(statistics.fmean(caught), 2),
            "expected_steps_bound": round(expected_steps(p, q, honest), 2),
            "median": caught[len(caught) // 2], "p95": caught[int(0.95 * len(caught))],
            "p99": caught[int(0.99 * len(caught))], "max": caught[-1],
            "bound_n95": n95, "bound_n99": n99,
            "tail_at_n95": round(sum(t > n95 for t in caught) / len(caught), 4),
            "tail_at_n95_bound": round(tail_bound(p, q, n95, honest), 4),
            "tail_at_n99": round(sum(t > n99 for t in caught) / len(caught), 4),
            "tail_at_n99_bound": round(tail_bound(p, q, n99, honest), 4),
        }
    return out


def real(args, model_path, local_model, prompt) -> dict:
    from liar import LyingPeer
    from localswarm import InProcessSwarm

    from client import ClientConfig, DistributedModelForCausalLM

    config = local_model.config
    new_tokens = max(args.new_tokens, 48)
    reference = local_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                     eos_token_id=None)
    trials = []
    swarm = InProcessSwarm()
    try:
        halves = even_spans(config.num_hidden_layers, 2)
        peer_fields = dict(model_id="bench-verify", device=args.device, dtype=args.dtype)
        honest = [server.peer_id for server in swarm.start_peers(model_path, halves * 2, **peer_fields)]
        honest_steps, q = 8, 0.3
        for trial in range(args.real_trials):
            (server,) = swarm.start_peers(model_path, [f"0:{config.num_hidden_layers}"], **peer_fields)
            liar = LyingPeer(server, probability=q, honest_steps=honest_steps, seed=trial).install()
            client_config = ClientConfig(initial_peers=tuple(swarm.initial_peers), model_id="bench-verify",
                                         verify_probability=args.real_p, verify_seed=trial, step_timeout_s=30)
            model = DistributedModelForCausalLM.from_pretrained(
                model_path, client_config=client_config, dtype=getattr(torch, args.dtype), device=args.device)
            # measured round trips that make the liar's single hop the route (as a fast liar would look)
            now = time.monotonic()
            model.latencies._rtt.update({peer: (0.05, now) for peer in honest} | {liar.peer_id: (0.0, now)})
            try:
                out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                     eos_token_id=None)
                stats = model.verify_stats
                trials.append({
                    "caught": liar.peer_id in model.trust.convicted, "first_lie_step": liar.first_lie,
                    "caught_at_step": stats.caught_at.get(liar.peer_id), "liar_steps": liar.steps,
                    "rewinds": stats.rewinds, "honest_convicted": len(model.trust.convicted) - (
                        liar.peer_id in model.trust.convicted),
                    "output_equals_reference": bool(torch.equal(out.cpu(), reference.cpu())),
                })
                log(f"real trial {trial}: {trials[-1]}")
            finally:
                model.shutdown()
                liar.uninstall()
                swarm.stop_peer(server)
    finally:
        swarm.close()
    return {"p": args.real_p, "q": q, "honest_steps": honest_steps, "new_tokens": new_tokens,
            "expected_steps_bound": round(expected_steps(args.real_p, q, honest_steps), 2),
            "bound_n99": steps_to_catch(args.real_p, 0.99, q, honest_steps),
            "note": "the check before generate returns caps each trial at the call's steps", "trials": trials,
            "all_caught": all(t["caught"] for t in trials),
            "all_outputs_equal": all(t["output_equals_reference"] for t in trials),
            "honest_convicted": sum(t["honest_convicted"] for t in trials)}


def run(args, work) -> dict:
    torch.set_num_threads(args.threads)
    model_path, local_model = prepare_model(args, work)
    seeded = torch.Generator().manual_seed(0)
    vocab = local_model.config.vocab_size
    prompt = torch.randint(4, vocab, (1, args.prompt_tokens), generator=seeded).to(args.device)
    result = {
        "benchmark": "verify", "machine": machine_info(args.device),
        "model": model_info(local_model.config, model_path),
        "settings": {"dtype": args.dtype, "probabilities": args.probabilities, "new_tokens": args.new_tokens,
                     "prompt_tokens": args.prompt_tokens, "repeats": args.repeats},
    }
    result["cost"] = cost(args, model_path, local_model, prompt)
    result["steps_until_caught_simulated"] = simulated(args)
    if args.real_trials:
        result["steps_until_caught_real"] = real(args, model_path, local_model, prompt)
    default = result["cost"]["results"].get("p=0.05")
    result["summary"] = {
        "decode_vs_none_at_default_p": default and default["decode_vs_none"],
        "first_token_vs_none_at_default_p": default and default["first_token_vs_none"],
        "simulated_within_bound": all(v["mean_steps"] <= v["expected_steps_bound"] * 1.05 + 1
                                      and v["tail_at_n99"] <= v["tail_at_n99_bound"] + 0.005
                                      for v in result["steps_until_caught_simulated"].values()),
    }
    return result


def main(argv=None) -> int:
    return run_benchmark(parse_args(argv), run, "bench_verify.")


if __name__ == "__main__":
    sys.exit(main())
