"""Time to first token of long prompts through a swarm, against local transformers, with where it goes.

Peers are real `swarm peer` processes (client.launcher.LocalSwarm) on loopback, an even split of the
blocks over --peers. For each --prompt-tokens length: local transformers `generate(max_new_tokens=1)`
and the same through the swarm (route planning and stream opening included: a fresh session per call),
one warm-up then --repeats runs each, medians; the first token must equal local's. Prints one JSON
object on stdout; progress goes to stderr.

Breakdown (swarm runs): the benchmark's own process notes `time.monotonic()` when each hop's reply is
read (`SpanStream._check`, wrapped here; nothing else changes), so `hop_done_ms[i]` is call start to
hop i's last result; `head_ms` is the call's end minus the last hop's result (norm + LM head + the
pick); each peer's scheduler `busy_s` (its forwards' wall time) around the runs gives `peer_forward_ms`.

    python benchmarks/bench_prefill.py                                         # CPU, tiny Llama
    python benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --llama8b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_decode  # benchmarks/bench_decode.py, beside this file
import torch
from bench_decode import add_model_args, finish_model_args, machine_info, model_info, prepare_model
from bench_serving import new_client, peer_infos, ready_fields

from client.launcher import LocalSwarm
from client.stream import SpanStream


def log(message: str) -> None:
    print(f"[bench_prefill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


bench_decode.log = log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=2, help="number of peers (an even split of the blocks)")
    p.add_argument("--prompt-tokens", default=None, help="comma-separated prompt lengths (default 128,512 "
                   "on CPU, 512,2048 otherwise)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", default="0,512", help="comma-separated ClientConfig.pipeline_chunk_tokens to "
                   "compare (0: the prompt as one step)")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    p.add_argument("--peer-flags", default="", help="more `swarm peer` flags (--peer-flags=--x=y)")
    add_model_args(p, "torch threads of the local model, the client and each peer")
    args = p.parse_args(argv)
    finish_model_args(args)
    lengths = args.prompt_tokens or ("128,512" if args.device == "cpu" else "512,2048")
    args.prompt_tokens = [int(n) for n in lengths.split(",")]
    args.chunks = [int(n) for n in args.chunks.split(",")]
    return args


def first_token(model, prompt: torch.Tensor) -> tuple[int, float]:
    start = time.monotonic()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    return int(out[0, -1]), time.monotonic() - start


class HopStamps:
    """Notes when each hop's reply is read, by wrapping `SpanStream._check` (the benchmark's process only)."""

    def __init__(self):
        self.stamps: list[tuple[int, float]] = []  # (hop's first block, time) in the order replies came
        self._original = SpanStream._check

    def __enter__(self) -> HopStamps:
        stamps, original = self.stamps, self._original

        def check(stream, reply, hidden, position):
            out = original(stream, reply, hidden, position)
            stamps.append((stream.hop.span.start, time.monotonic()))
            return out

        SpanStream._check = check
        return self

    def __exit__(self, *exc) -> None:
        SpanStream._check = self._original


def busy(infos: list[dict]) -> list[float]:
    return [float(i.get("scheduler", {}).get("busy_s", 0.0)) for i in infos]


def swarm_runs(client, prompt, repeats: int, peers) -> dict:
    first_token(client, prompt)  # warm-up
    runs = []
    before = busy(peer_infos(client, peers))
    for _ in range(repeats):
        with HopStamps() as hs:
            start = time.monotonic()
            token, seconds = first_token(client, prompt)
        ends: dict[int, float] = {}
        for block, at in hs.stamps:
            ends[block] = at  # the last reply of each hop (a chunked prompt has several)
        done = [round((at - start) * 1000, 2) for _, at in sorted(ends.items())]
        runs.append({"s": seconds, "token": token, "hop_done_ms": done,
                     "head_ms": round(seconds * 1000 - done[-1], 2) if done else None})
    after = busy(peer_infos(client, peers))
    median = statistics.median(r["s"] for r in runs)
    return {
        "s": round(median, 4), "runs_s": [round(r["s"], 4) for r in runs], "token": runs[0]["token"],
        "tokens_agree": len({r["token"] for r in runs}) == 1,
        "hop_done_ms": [statistics.median(r["hop_done_ms"][i] for r in runs)
                        for i in range(len(runs[0]["hop_done_ms"]))],
        "head_ms": statistics.median(r["head_ms"] for r in runs),
        "peer_forward_ms": [round((a - b) * 1000 / repeats, 2) for a, b in zip(after, before, strict=True)],
    }


def run(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    model_path, local = prepare_model(args, work)
    config = local.config
    seeded = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(4, config.vocab_size, (1, n), generator=seeded).to(args.device)
               for n in args.prompt_tokens}
    local_out = {}
    for n, prompt in prompts.items():
        first_token(local, prompt)
        times, tokens = [], set()
        for _ in range(args.repeats):
            token, seconds = first_token(local, prompt)
            times.append(seconds)
            tokens.add(token)
        local_out[n] = {"s": round(statistics.median(times), 4), "runs_s": [round(t, 4) for t in times],
                        "token": tokens.pop() if len(tokens) == 1 else None}
        log(f"local: {n} tokens -> first token in {local_out[n]['s'] * 1000:.1f} ms")
    spans = bench_decode.even_spans(config.num_hidden_layers, args.peers)
    flags = ["--device", args.device, "--dtype", args.dtype, *args.peer_flags.split()]
    results = {}
    with LocalSwarm(str(model_path), startup_timeout_s=args.startup_timeout_s,
                    peer_threads=args.threads) as swarm:
        procs = swarm.start_peers(spans, extra=flags)
        peers = [ready_fields(p.ready_line) for p in procs]
        for chunk in args.chunks:
            client = new_client(model_path, swarm.initial_peers, args, pipeline_chunk_tokens=chunk)
            try:
                for n, prompt in prompts.items():
                    sw = swarm_runs(client, prompt, args.repeats, peers)
                    ratio = round(sw["s"] / local_out[n]["s"], 3)
                    log(f"swarm, parts of {chunk}: {n} tokens -> {sw['s'] * 1000:.1f} ms ({ratio}x local), "
                        f"hops done at {sw['hop_done_ms']} ms, head {sw['head_ms']} ms, "
                        f"forwards {sw['peer_forward_ms']} ms")
                    equal = sw["tokens_agree"] and sw["token"] == local_out[n]["token"]
                    results[(chunk, n)] = {"local": local_out[n], "swarm": sw, "swarm_over_local": ratio,
                                           "first_token_equal": equal}
            finally:
                client.shutdown()
    return {
        "benchmark": "bench_prefill", "machine": machine, "model": model_info(config, model_path),
        "spans": spans, "peer_flags": args.peer_flags, "repeats": args.repeats,
        "runs": {f"parts_{c}_prompt_{n}": r for (c, n), r in results.items()},
        "summary": {f"parts_{c}_prompt_{n}": {"local_ms": round(r["local"]["s"] * 1000, 1),
                             "swarm_ms": round(r["swarm"]["s"] * 1000, 1),
                             "swarm_over_local": r["swarm_over_local"],
                             "first_token_equal": r["first_token_equal"]} for (c, n), r in results.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        out = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_prefill-") as tmp:
            out = run(args, Path(tmp))
    print(json.dumps(out, indent=2))
    return 0 if all(r["first_token_equal"] for r in out["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
