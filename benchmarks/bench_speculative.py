"""Speculative decoding against plain decoding over slow links: a 2-peer swarm, 50 ms one way per link.

Two real `swarm peer` processes (client.launcher.LocalSwarm) each sit behind a delaying relay
(benchmarks/delay_relay.py, a separate process): a peer listens on a port of its own and announces the
relay's port instead (`--announce-maddrs`, and `--no-direct`, so no direct TLS port is announced beside
it), so the client and the other peer reach it through the relay only, each direction of each link
paying --delay-ms. The relay's byte counts at the end show that every peer's traffic went through it.

Greedy decoding, EOS off, of --new-tokens tokens per prompt, plain (`generate`) and speculative
(`generate(speculative=True)`: n-gram prompt lookup drafts, the adaptive draft length), one after the
other per prompt on the same client (the order alternates from prompt to prompt), after a warm-up of
each. Figures per kind of text:

  * repetitive: prompts that are lists being continued (a short cycle of token ids repeated). The
    model's weights are random, so what it continues repetitively is its own business: from
    --candidates such prompts the benchmark keeps the --prompts whose local greedy continuation the
    n-gram source drafts best (simulated locally, before any swarm runs; all candidates' rates are in
    the JSON), which is what code or a list is to a trained model;
  * random: prompts of random token ids, the first --prompts of a seeded sequence (no selection).

tokens_s = new tokens / the generate call's wall time (prefill, route, stream opening included, alike for
both); decode_tokens_s = (N - 1) / (time of token N - time of token 1). Ratios are speculative over plain,
of total tokens over total time of the kind's prompts. Tokens must equal between the two and local
transformers (`tokens_equal`).

    python benchmarks/bench_speculative.py --new-tokens 40 --prompts 3     # CPU, tiny Llama, ~2 min
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_decode import (
    add_model_args,
    even_spans,
    finish_model_args,
    machine_info,
    model_info,
    prepare_model,
    run_benchmark,
)

from client import ClientConfig, DistributedModelForCausalLM
from client.launcher import LocalSwarm
from client.speculative import Speculative, ngram_draft

HERE = Path(__file__).resolve().parent
TARGETS = {"repetitive": 2.0, "random": 0.9}


def log(message: str) -> None:
    print(f"[bench_speculative {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay per link, each direction")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--prompts", type=int, default=3, help="prompts per kind of text")
    p.add_argument("--candidates", type=int, default=48, help="repetitive prompts to pick --prompts from")
    p.add_argument("--max-draft-tokens", type=int, default=8)
    add_model_args(p, threads_help="torch CPU threads here (local model, client) and in each peer "
                                   "(--num-threads)")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    finish_model_args(args)
    if args.new_tokens < 3 or args.prompts < 1 or args.candidates < args.prompts:
        p.error("need --new-tokens >= 3, --prompts >= 1 and --candidates >= --prompts")
    return args


# ---------------------------------------------------------------- prompts


def greedy(model, prompt: torch.Tensor, new_tokens: int, streamer=None, **kwargs) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer, **kwargs)
    return out[0, prompt.shape[1]:].tolist()


def ngram_rate(prompt: list[int], continuation: list[int]) -> float:
    """Share of the continuation's tokens (but the last) that prompt lookup drafts from the tokens before."""
    tokens = prompt + continuation
    start = len(prompt)
    hits = sum(ngram_draft(tokens[:i], 1) == [tokens[i]] for i in range(start, len(tokens) - 1))
    return hits / max(1, len(continuation) - 1)


def pick_prompts(local, vocab: int, args) -> dict:
    """{kind: [(prompt [1, n], local greedy tokens, simulated n-gram rate)]} and every candidate's rate."""
    seeded = torch.Generator().manual_seed(0)
    candidates = []
    for i in range(args.candidates):
        period = 1 + i % 3  # a list of one to three items, repeated
        cycle = torch.randint(4, vocab, (period,), generator=seeded).tolist()
        tokens = (cycle * args.prompt_tokens)[: args.prompt_tokens]
        prompt = torch.tensor([tokens])
        continuation = greedy(local, prompt, args.new_tokens)
        candidates.append((prompt, continuation, ngram_rate(tokens, continuation)))
    ranked = sorted(candidates, key=lambda c: -c[2])
    randoms = []
    for _ in range(args.prompts):
        prompt = torch.randint(4, vocab, (1, args.prompt_tokens), generator=seeded)
        continuation = greedy(local, prompt, args.new_tokens)
        randoms.append((prompt, continuation, ngram_rate(prompt[0].tolist(), continuation)))
    return {"repetitive": ranked[: args.prompts], "random": randoms,
            "candidate_rates": [round(c[2], 3) for c in candidates]}


# ---------------------------------------------------------------- the slow links


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """benchmarks/delay_relay.py as a process, one route per peer; `stats()` stops it, returns its counts."""

    def __init__(self, targets: list[int], delay_ms: float):
        routes = [f"--route=0:{port}" for port in targets]
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE / "delay_relay.py"), f"--delay-ms={delay_ms}", *routes],
            stdout=subprocess.PIPE, text=True)
        line = self.popen.stdout.readline().split()
        if line[:2] != ["relay", "ready"]:
            self.popen.kill()
            raise RuntimeError(f"the relay did not start: {line}")
        self.ports = [int(p) for p in line[2:]]

    def stats(self) -> dict:
        self.popen.send_signal(2)  # SIGINT: print the counts, exit
        out, _ = self.popen.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


# ---------------------------------------------------------------- timing


class Stamps:
    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())  # the prompt first, then one per new token

    def end(self) -> None:
        pass


def timed(client, prompt, args, speculative: bool) -> dict:
    stamps = Stamps()
    start = time.perf_counter()
    tokens = greedy(client, prompt, args.new_tokens, streamer=stamps,
                    speculative=Speculative(max_draft_tokens=args.max_draft_tokens) if speculative else None)
    wall = time.perf_counter() - start
    n = len(tokens)
    run = {"tokens": tokens, "wall_s": wall, "tokens_s": n / wall,
           "decode_tokens_s": (n - 1) / (stamps.times[-1] - stamps.times[1]) if n > 1 else None}
    if speculative:
        s = client.last_speculation
        run.update(rounds=s.rounds, drafted=s.drafted, accepted=s.accepted,
                   acceptance=s.accepted / s.drafted if s.drafted else None,
                   tokens_per_round=s.tokens_per_round)
    return run


def summarize(kind: str, runs: list[dict]) -> dict:
    def total(mode, key):
        return sum(r[mode][key] for r in runs)

    tokens = sum(len(r["plain"]["tokens"]) for r in runs)
    plain_s, spec_s = total("plain", "wall_s"), total("speculative", "wall_s")
    rounds, drafted, accepted = (total("speculative", k) for k in ("rounds", "drafted", "accepted"))
    return {
        "plain_tokens_s": round(tokens / plain_s, 3),
        "speculative_tokens_s": round(tokens / spec_s, 3),
        "speedup": round(plain_s / spec_s, 3),
        "decode_speedup_median": round(statistics.median(
            r["speculative"]["decode_tokens_s"] / r["plain"]["decode_tokens_s"] for r in runs), 3),
        "plain_ms_per_token": round(1e3 * plain_s / tokens, 1),
        "tokens_per_round": round(tokens / rounds, 3),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "target": TARGETS[kind],
        "meets_target": plain_s / spec_s >= TARGETS[kind],
        "tokens_equal": all(r["equal"] for r in runs),
        "per_prompt": [{
            "prompt": r["prompt"], "simulated_ngram_rate": round(r["rate"], 3),
            "plain_tokens_s": round(r["plain"]["tokens_s"], 3),
            "speculative_tokens_s": round(r["speculative"]["tokens_s"], 3),
            "speedup": round(r["plain"]["wall_s"] / r["speculative"]["wall_s"], 3),
            "rounds": r["speculative"]["rounds"], "drafted": r["speculative"]["drafted"],
            "accepted": r["speculative"]["accepted"], "equal": r["equal"],
        } for r in runs],
    }


# ---------------------------------------------------------------- run


def run(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    model_path, local = prepare_model(args, work)
    config = local.config
    log("picking prompts (local greedy continuations)")
    prompts = pick_prompts(local, config.vocab_size, args)
    spans = even_spans(config.num_hidden_layers, 2)
    ports = [free_port() for _ in spans]
    relay = Relay(ports, args.delay_ms)
    result = {
        "benchmark": "speculative", "machine": machine_info(args.device),
        "model": model_info(config, model_path),
        "settings": {"delay_ms_one_way_per_link": args.delay_ms, "new_tokens": args.new_tokens,
                     "prompt_tokens": args.prompt_tokens, "prompts_per_kind": args.prompts,
                     "repetitive_candidates": args.candidates, "max_draft_tokens": args.max_draft_tokens,
                     "spans": spans, "greedy": True, "server_to_server": True,
                     "peer_transport": "libp2p (--no-direct)"},
        "candidate_ngram_rates": prompts["candidate_rates"],
    }
    try:
        with LocalSwarm(str(model_path), startup_timeout_s=args.startup_timeout_s,
                        peer_threads=args.threads) as swarm:
            log(f"starting peers {spans} behind the relay (ports {relay.ports} -> {ports}, "
                f"{args.delay_ms} ms one way)")
            procs = [swarm.start_peer(span, wait=False, extra=[
                "--port", str(port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{relayed}", "--no-direct",
                "--device", args.device, "--dtype", args.dtype])
                for span, port, relayed in zip(spans, ports, relay.ports, strict=True)]
            for proc in procs:
                swarm.wait_ready(proc)
            client_config = ClientConfig(initial_peers=tuple(swarm.initial_peers), wait_for_route_s=60,
                                         step_timeout_s=60)
            client = DistributedModelForCausalLM.from_pretrained(
                model_path, client_config=client_config, dtype=getattr(torch, args.dtype), device=args.device)
            try:
                log("warm-up")
                warm = prompts["random"][0][0]
                for speculative in (False, True):
                    timed(client, warm, args, speculative)
                for kind in ("repetitive", "random"):
                    runs = []
                    for i, (prompt, expected, rate) in enumerate(prompts[kind]):
                        order = (False, True) if i % 2 == 0 else (True, False)
                        modes = {("speculative" if s else "plain"): timed(client, prompt, args, s)
                                 for s in order}
                        equal = modes["plain"]["tokens"] == modes["speculative"]["tokens"] == expected
                        runs.append({"prompt": prompt[0].tolist(), "rate": rate, "equal": equal, **modes})
                        spec = modes["speculative"]
                        log(f"{kind} {i}: plain {modes['plain']['tokens_s']:.2f} tokens/s, speculative "
                            f"{spec['tokens_s']:.2f} tokens/s ({spec['rounds']} rounds, "
                            f"{spec['accepted']}/{spec['drafted']} drafts), tokens equal: {equal}")
                    result[kind] = summarize(kind, runs)
            finally:
                client.shutdown()
    finally:
        stats = relay.stats() if relay.popen.poll() is None else None
        relay.kill()
    result["relay"] = stats
    routes = (stats or {}).get("routes", [])
    result["all_peer_traffic_relayed"] = bool(routes) and all(
        r["bytes_to_target"] > 0 and r["bytes_from_target"] > 0 for r in routes)
    result["summary"] = {
        "repetitive_speedup": result["repetitive"]["speedup"], "random_speedup": result["random"]["speedup"],
        "targets": TARGETS,
        "meets_targets": result["repetitive"]["meets_target"] and result["random"]["meets_target"],
        "tokens_equal": result["repetitive"]["tokens_equal"] and result["random"]["tokens_equal"],
        "plain_ms_per_token": result["random"]["plain_ms_per_token"],
    }
    return result


def main(argv=None) -> int:
    return run_benchmark(parse_args(argv), run, "bench_speculative.")


if __name__ == "__main__":
    sys.exit(main())
