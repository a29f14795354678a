"""Overload: N separate clients against peers whose KV budget fits a quarter of them.

For each N in --clients: a fresh swarm of `swarm peer` processes (an even split of a tiny Llama's blocks
over --peers), each peer's `--cache-tokens` = ceil(N / 4) sessions of (prompt + new tokens), then N
separate clients (each its own DistributedModelForCausalLM and p2pd, one thread each) generate greedily
at once (tests/overload.py). Prints one JSON object: per N, how many completed (tokens equal local
transformers'), were refused up front (before their first token), found no route (must be 0), failed
(must be 0), were moved mid-generation, the worst step latency (the longest gap between two tokens of one client) and the worst
time to first token (admission waits included), with the wall time of the whole crowd.

    python benchmarks/bench_overload.py                      # N = 8, 32, 128 through 2 peers
    python benchmarks/bench_overload.py --clients 8 --peers 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from overload import prompts, references, run_clients, summary  # noqa: E402  (tests/overload.py)
from transformers import AutoConfig  # noqa: E402

from client.launcher import LocalSwarm  # noqa: E402
from swarm.tiny import make_tiny_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="8,32,128", help="comma-separated crowd sizes")
    p.add_argument("--peers", type=int, default=2, help="peers of the route (an even split of the blocks)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--admission-timeout-s", type=float, default=10.0, help="the peers' (their default: 10)")
    p.add_argument("--wait-for-route-s", type=float, help="the clients' wait for missing blocks (default: theirs)")
    return p.parse_args(argv)


def spans(layers: int, peers: int) -> list[str]:
    cuts = [round(i * layers / peers) for i in range(peers + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]


def crowd(model_path: Path, n: int, args) -> dict:
    session_tokens = args.prompt_tokens + args.new_tokens
    room = math.ceil(n / 4) * session_tokens
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    asked = prompts(n, args.prompt_tokens, vocab, seed=n)
    expected = references(model_path, asked, args.new_tokens)
    extra = ["--cache-tokens", str(room), "--admission-timeout-s", str(args.admission_timeout_s)]
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peers(spans(args.layers, args.peers), extra=extra)
        print(f"N = {n}: {args.peers} peers with room for {room // session_tokens} sessions each", file=sys.stderr)
        started = time.monotonic()
        fields = {} if args.wait_for_route_s is None else {"wait_for_route_s": args.wait_for_route_s}
        outcomes = run_clients(model_path, swarm.initial_peers, asked, expected, args.new_tokens, fields)
        wall_s = time.monotonic() - started
    return {**summary(outcomes), "sessions_that_fit": room // session_tokens, "wall_s": round(wall_s, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as work:
        model_path = Path(work) / "tiny-llama"
        make_tiny_model("llama", model_path, num_layers=args.layers)
        results = {str(n): crowd(model_path, int(n), args) for n in args.clients.split(",")}
    print(json.dumps({
        "peers": args.peers, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "admission_timeout_s": args.admission_timeout_s, "crowds": results,
    }, indent=2))
    return 0 if all(r["failed"] == r["unrouted"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
