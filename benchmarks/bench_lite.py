"""The lite transport (py-libp2p, no hivemind) against the hivemind transport: per-hop overhead and
single-session decode speed on loopback, in one run, as one JSON object on stdout.

One swarm of real `swarm peer` processes (tiny Llama, 8 blocks: peers 0:8, 0:4 and 4:8). Each client
runs in a process of its own (the two backends cannot share one): this file again with `--worker`,
under this python for hivemind and under the lite environment's python (`make lite-venv`) for lite,
each with the peers' direct TLS streams on (swarm.direct, the same code on both backends) and off
(libp2p streams: hivemind's through its own p2pd, lite's straight from py-libp2p to the peer's p2pd).
Every client measures, on 1 hop (0:8) and on 2 hops (0:4, 4:8) chosen with `blocked_peers`, with
client-path steps (`server_to_server=False`, so every hop is the client's transport):
  * decode tokens/s of greedy generation (token 1 to token N, prefill and route planning left out),
    median over repeats after a warm-up; its tokens must equal local transformers';
  * `per_hop_ms`: 2-hop step time minus 1-hop step time (the blocks' compute is the same in total);
  * `info_rtt_ms`: the median round trip of an `info` request on an open stream (timed_request).
Local transformers' decode speed on the same prompt is the baseline; ratios are against the hivemind
transport on the same stream path, measured in the same run.

    python benchmarks/bench_lite.py [--new-tokens 48 --repeats 3 --rounds 3 --lite-python PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_SEED = 0


def log(message: str) -> None:
    print(f"[bench_lite] {message}", file=sys.stderr, flush=True)


def stamps_streamer(stamps: list[float]):
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    return Stamps()


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s from token 1 to token N (stamps[0] is the prompt, stamps[1] the first new token)."""
    tokens = stamps[1:]
    return (len(tokens) - 1) / (tokens[-1] - tokens[0])


# ---------------------------------------------------------------- worker (either environment)


def worker(spec: dict) -> dict:
    import torch

    from client import ClientConfig, DistributedModelForCausalLM, loop
    from swarm.protocol import INFO_HANDLER

    torch.set_num_threads(1)  # as the driver's local baseline and each peer
    prompt = torch.tensor([spec["prompt"]])
    out: dict = {"splits": {}}
    for name, split in spec["splits"].items():
        config = ClientConfig(initial_peers=tuple(spec["initial_peers"]), transport=spec["transport"],
                              direct=spec["direct"], blocked_peers=tuple(split["blocked"]),
                              server_to_server=False, step_timeout_s=30.0)
        model = DistributedModelForCausalLM.from_pretrained(spec["model"], client_config=config)
        try:
            started = time.perf_counter()
            transport = loop.run(model.transport(), 120)
            join_s = time.perf_counter() - started
            rates, equal, hops = [], True, None
            for attempt in range(spec["repeats"] + 1):  # the first is the warm-up
                stamps: list[float] = []
                with model.inference_session(max_length=prompt.shape[1] + spec["new_tokens"]) as session:
                    tokens = model.generate(prompt, max_new_tokens=spec["new_tokens"], do_sample=False,
                                            pad_token_id=0, eos_token_id=None,
                                            streamer=stamps_streamer(stamps))
                    hops = [h.peer_id for h in session.route]
                equal = equal and tokens[0].tolist() == spec["expected"]
                if attempt:
                    rates.append(decode_rate(stamps))
            rtts = []
            for peer_id in hops:
                addrs = split["addrs"][peer_id]
                for _ in range(spec["rtt_samples"]):
                    ask = transport.timed_request(peer_id, addrs, INFO_HANDLER, {"type": "info"}, 10)
                    _, rtt_s = loop.run(ask, 30)
                    rtts.append(rtt_s)
        finally:
            model.shutdown()
        out["splits"][name] = {
            "hops": len(hops), "route_as_planned": sorted(hops) == sorted(split["route"]),
            "rates": rates, "rtts_ms": [1000 * r for r in rtts], "tokens_equal_local": equal,
            "join_s": join_s,
        }
    out["transport_class"] = type(transport).__name__
    out["hivemind_imported"] = "hivemind" in sys.modules
    out["libp2p_imported"] = "libp2p" in sys.modules
    return out


# ---------------------------------------------------------------- driver (the hivemind environment)


def local_baseline(model_path: str, prompt, new_tokens: int, repeats: int) -> tuple[list[int], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rates, tokens = [], None
    for attempt in range(repeats + 1):
        stamps: list[float] = []
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             eos_token_id=None, streamer=stamps_streamer(stamps))
        tokens = out[0].tolist()
        if attempt:
            rates.append(decode_rate(stamps))
    return tokens, statistics.median(rates)


def run_worker(python: str, spec: dict, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([python, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout_s)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {spec['transport']} direct={spec['direct']} failed ({done.returncode}):\n"
                       f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def merge(rounds: list[dict]) -> dict:
    """One client kind's figures over all rounds: medians over every timed run and round trip."""
    out: dict = {"splits": {}}
    for name in rounds[0]["splits"]:
        parts = [r["splits"][name] for r in rounds]
        rates = [x for part in parts for x in part["rates"]]
        rate = statistics.median(rates)
        out["splits"][name] = {
            "hops": parts[0]["hops"], "decode_tokens_s": round(rate, 1), "step_ms": round(1000 / rate, 3),
            "decode_tokens_s_runs": [round(x, 1) for x in rates],
            "info_rtt_ms": round(statistics.median([x for part in parts for x in part["rtts_ms"]]), 3),
            "join_s_median": round(statistics.median(part["join_s"] for part in parts), 2),
            "tokens_equal_local": all(part["tokens_equal_local"] for part in parts),
            "route_as_planned": all(part["route_as_planned"] for part in parts),
        }
    out["per_hop_ms"] = round(out["splits"]["2_hops"]["step_ms"] - out["splits"]["1_hop"]["step_ms"], 3)
    for field in ("transport_class", "hivemind_imported", "libp2p_imported"):
        out[field] = rounds[0][field]
    return out


def peer_of(proc) -> tuple[str, list[str]]:
    line = proc.ready_line
    return line.split("peer_id=")[1].split()[0], line.split("addrs=")[1].split()[0].split(",")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per client and split, per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="every client kind runs once per round, in turn, so load changes hit them alike")
    p.add_argument("--rtt-samples", type=int, default=20)
    p.add_argument("--lite-python", default=str(ROOT / ".venv-lite" / "bin" / "python"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if not Path(args.lite_python).exists():
        print(f"no lite environment at {args.lite_python}: `make lite-venv`", file=sys.stderr)
        return 2

    import torch

    from client.launcher import LocalSwarm
    from swarm.tiny import make_tiny_model

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-lite-") as work:
        model_path = str(make_tiny_model("llama", Path(work) / "tiny-llama", num_layers=8))
        seeded = torch.Generator().manual_seed(PROMPT_SEED)
        prompt = torch.randint(3, 500, (1, args.prompt_tokens), generator=seeded)
        expected, local_rate = local_baseline(model_path, prompt, args.new_tokens, args.repeats)
        log(f"local transformers: {local_rate:.1f} tokens/s")
        with LocalSwarm(model_path) as swarm:
            whole, first, second = (peer_of(proc) for proc in swarm.start_peers(["0:8", "0:4", "4:8"]))
            addrs = dict((whole, first, second))
            splits = {
                "1_hop": {"blocked": [first[0], second[0]], "route": [whole[0]], "addrs": addrs},
                "2_hops": {"blocked": [whole[0]], "route": [first[0], second[0]], "addrs": addrs},
            }
            raw: dict[str, list[dict]] = {}
            for round_index in range(args.rounds):
                for transport, python in (("hivemind", sys.executable), ("lite", args.lite_python)):
                    for direct in (True, False):
                        key = f"{transport}_{'direct' if direct else 'libp2p'}"
                        log(f"round {round_index + 1}/{args.rounds}: client {key} ...")
                        spec = {"model": model_path, "initial_peers": list(swarm.initial_peers),
                                "transport": transport, "direct": direct, "prompt": prompt[0].tolist(),
                                "expected": expected, "new_tokens": args.new_tokens, "repeats": args.repeats,
                                "rtt_samples": args.rtt_samples, "splits": splits}
                        raw.setdefault(key, []).append(run_worker(python, spec, 600))
            results = {key: merge(rounds) for key, rounds in raw.items()}
            for key, r in results.items():
                log(f"  {key}: {r['splits']['1_hop']['decode_tokens_s']} tokens/s on 1 hop, per hop "
                    f"{r['per_hop_ms']} ms, info rtt {r['splits']['1_hop']['info_rtt_ms']} ms")
    summary = {"local_decode_tokens_s": round(local_rate, 1)}
    for path in ("direct", "libp2p"):
        lite, hive = results[f"lite_{path}"], results[f"hivemind_{path}"]
        summary[path] = {
            "lite_tokens_s_1_hop": lite["splits"]["1_hop"]["decode_tokens_s"],
            "hivemind_tokens_s_1_hop": hive["splits"]["1_hop"]["decode_tokens_s"],
            "lite_over_hivemind_tokens_s": round(lite["splits"]["1_hop"]["decode_tokens_s"]
                                                 / hive["splits"]["1_hop"]["decode_tokens_s"], 3),
            "lite_over_local_tokens_s": round(lite["splits"]["1_hop"]["decode_tokens_s"] / local_rate, 3),
            "lite_per_hop_ms": lite["per_hop_ms"], "hivemind_per_hop_ms": hive["per_hop_ms"],
            "lite_info_rtt_ms": lite["splits"]["1_hop"]["info_rtt_ms"],
            "hivemind_info_rtt_ms": hive["splits"]["1_hop"]["info_rtt_ms"],
            "lite_over_hivemind_info_rtt": round(lite["splits"]["1_hop"]["info_rtt_ms"]
                                                 / hive["splits"]["1_hop"]["info_rtt_ms"], 3),
        }
    summary["all_tokens_equal_local"] = all(s["tokens_equal_local"] for r in results.values()
                                            for s in r["splits"].values())
    summary["all_routes_as_planned"] = all(s["route_as_planned"] for r in results.values()
                                           for s in r["splits"].values())
    lite_kinds = [results["lite_direct"], results["lite_libp2p"]]
    summary["lite_without_hivemind"] = all(r["libp2p_imported"] and not r["hivemind_imported"]
                                           for r in lite_kinds)
    print(json.dumps({
        "benchmark": "bench_lite", "summary": summary, "clients": results,
        "config": {"model": "tiny llama, 8 blocks, float32, CPU", "new_tokens": args.new_tokens,
                   "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "rounds": args.rounds,
                   "rtt_samples": args.rtt_samples,
                   "server_to_server": False, "peers": ["0:8", "0:4", "4:8"], "peer_threads": 1},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_1min_at_start": round(load_start, 2),
                    "loadavg_1min_at_end": round(os.getloadavg()[0], 2)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
