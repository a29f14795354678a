"""Recovery benchmark: how long a generation stalls when a peer of its route dies or drains.

- crash: kill -9 of the route's peer at a decode step; recovery latency = time from the kill to the
  next token, against the median normal step of the same run; for a short and a long context
  (the replacement is fed every kept input, so the context length is what recovery costs).
- drain: several concurrent sessions (one client each) through one peer that gets SIGTERM mid-way;
  reports how many sessions moved, whether any step failed, and the worst step latency during the
  move against a normal step.

Prints one JSON object; progress on stderr. Every output is also checked against local transformers.

    python benchmarks/bench_recovery.py [--layers 6] [--long-context 1024] [--sessions 4]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM
from client.launcher import LocalSwarm
from swarm.tiny import make_tiny_model


def log(text: str) -> None:
    print(f"[bench_recovery {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Stamps(BaseStreamer):
    """Records when each token arrives; runs `action` right after token `at_token` (a step boundary)."""

    def __init__(self, at_token: int | None = None, action=None):
        self.times: list[float] = []
        self.at_token, self.action = at_token, action
        self.action_time: float | None = None

    def put(self, value):
        self.times.append(time.perf_counter())
        if self.at_token is not None and len(self.times) == self.at_token + 1:
            self.action_time = time.perf_counter()
            self.action()

    def end(self):
        pass


def peer_of(procs, peer_id):
    return next(p for p in procs if peer_id in p.ready_line)


def crash_case(model_path, swarm, procs, prompt_len: int, new_tokens: int, kill_at: int) -> dict:
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompt = torch.randint(3, 500, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = local.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    client = DistributedModelForCausalLM.from_pretrained(
        model_path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers))
    )
    try:
        client.generate(prompt[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        killed = {}

        def kill():
            hop = client.active_session.route[0]
            proc = peer_of(procs, hop.peer_id)
            killed["span"] = str(hop.span)
            proc.kill(signal.SIGKILL)

        stamps = Stamps(kill_at, kill)
        with client.inference_session(max_length=prompt_len + new_tokens) as session:
            out = client.generate(prompt, attention_mask=torch.ones_like(prompt), streamer=stamps, **kwargs)
            recoveries = session.recoveries
        steps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]
        after = stamps.times[kill_at + 1] - stamps.action_time
        normal = statistics.median(steps)
        return {
            "context_tokens": prompt_len + kill_at, "killed_span": killed.get("span"), "recoveries": recoveries,
            "normal_step_ms": round(normal * 1e3, 2), "recovery_ms": round(after * 1e3, 2),
            "recovery_over_step": round(after / normal, 1), "tokens_equal_local": bool(torch.equal(out, expected)),
        }
    finally:
        client.shutdown()


def drain_case(model_path, swarm, procs, sessions: int, new_tokens: int, term_at: int) -> dict:
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompt = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = local.generate(prompt, **kwargs)
    clients = [
        DistributedModelForCausalLM.from_pretrained(
            model_path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers))
        )
        for _ in range(sessions)
    ]
    results: list[dict] = [{} for _ in clients]
    barrier = threading.Barrier(sessions)
    full = procs[0]  # the one-hop peer serving every block: the route every client picks first

    def run(i: int, client) -> None:
        client.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        barrier.wait()
        stamps = Stamps(term_at, (lambda: full.kill(signal.SIGTERM)) if i == 0 else (lambda: None))
        try:
            with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
                first_route = [str(h.span) for h in session.route]
                out = client.generate(prompt, streamer=stamps, **kwargs)
                results[i] = {"moved": session.recoveries > 0, "first_route": first_route,
                              "route": [str(h.span) for h in session.route], "equal": bool(torch.equal(out, expected)),
                              "steps_s": [b - a for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]}
        except Exception as e:  # a failed step is exactly what this benchmark looks for
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exit_code = full.popen.wait(60)
    for client in clients:
        client.shutdown()
    steps = [s for r in results for s in r.get("steps_s", [])]
    return {
        "sessions": sessions, "sessions_moved": sum(r.get("moved", False) for r in results),
        "failed_sessions": [r["error"] for r in results if "error" in r],
        "all_equal_local": all(r.get("equal") for r in results), "peer_exit_code": exit_code,
        "normal_step_ms": round(statistics.median(steps) * 1e3, 2) if steps else None,
        "worst_step_ms": round(max(steps) * 1e3, 2) if steps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--long-context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_recovery."))
    model_path = make_tiny_model("llama", work / "tiny-llama", num_layers=args.layers)
    n = args.layers
    spans = [f"0:{n}", f"0:{n // 2}", f"{n // 2}:{n}", f"0:{n}"]
    report: dict = {"benchmark": "recovery", "model": {"family": "llama", "layers": n, "hidden_size": 64},
                    "spans": spans, "crash": [], "drain": None}
    for prompt_len in (16, args.long_context):
        with LocalSwarm(str(model_path)) as swarm:
            procs = swarm.start_peers(spans)
            log(f"crash, context {prompt_len}")
            report["crash"].append(crash_case(model_path, swarm, procs, prompt_len, args.new_tokens, kill_at=8))
            log(json.dumps(report["crash"][-1]))
    with LocalSwarm(str(model_path)) as swarm:
        procs = swarm.start_peers([f"0:{n}", f"0:{n // 2}", f"{n // 2}:{n}"], extra=["--drain-grace-s", "60"])
        log(f"drain with {args.sessions} sessions")
        report["drain"] = drain_case(model_path, swarm, procs, args.sessions, args.new_tokens, term_at=8)
        log(json.dumps(report["drain"]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
