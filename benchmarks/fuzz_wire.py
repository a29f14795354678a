"""A long seeded wire fuzz campaign against two in-process peers, beside a healthy session: prints JSON.

    python benchmarks/fuzz_wire.py [--count 50000] [--seed 2024] [--timeout-s 3600] [--baseline-s 10]

The campaign of tests/test_wire_fuzz.py (tests/wirefuzz.py), longer: two peers (real p2pd, DHT and direct
TLS ports) serve a tiny llama as 0:3 and 3:6; a raw client sends mutated messages in sessions, at stream
open, forwarded, before and in the direct handshake, over p2pd and the direct port, while the real client
generates greedily through the same peers in a loop and compares each generation with local transformers.
The cases run in chunks of --chunk (chunk i seeded "{seed}" for i = 0, else "{seed}.{i}": a run of one
chunk is exactly the test's campaign for that seed); no chunk starts after --timeout-s, and one still
running then is cut off (its figures are lost, the JSON says so). Baseline, in the same run: the healthy
session alone for --baseline-s, so its rate under fuzzing reads as a ratio. Exit status 1 on any harm:
a silent case, a peer that stopped answering, a peer error logged, a healthy generation that differed,
failed or recovered, or a peer left holding sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from localswarm import InProcessSwarm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from wirefuzz import OUTCOMES, Healthy, PeerErrors, Report, Target, Wire, campaign  # noqa: E402

from client import ClientConfig, DistributedModelForCausalLM  # noqa: E402
from swarm.tiny import make_tiny_model  # noqa: E402

MODEL_ID = "wire-fuzz-bench-llama"
SPANS = ["0:3", "3:6"]
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
NEW_TOKENS = 6
# as in tests/test_wire_fuzz.py: small limits keep oversized cases cheap; a healthy step is a few KiB
PEER_LIMITS = dict(max_message_bytes=32 * 1024, max_tokens_per_step=64, max_session_length_tokens=512)
IDLE_WAIT_S = 10.0


def merge(into: Report, part: Report) -> None:
    into.outcomes.update(part.outcomes)
    for worker, counts in part.by_worker.items():
        into.by_worker.setdefault(worker, Counter()).update(counts)
    into.by_mutation.update(part.by_mutation)
    into.silences.extend(part.silences)
    into.deaths.extend(part.deaths)
    into.info_failures.extend(part.info_failures)
    into.messages += part.messages
    into.info_checks += part.info_checks


def chunk_seed(seed: int, i: int) -> str | int:
    return seed if i == 0 else f"{seed}.{i}"


def run_chunks(wire: Wire, targets: list[Target], args, report: Report) -> dict:
    """Chunks of the campaign until --count cases ran or --timeout-s passed; what happened to them."""
    deadline = time.monotonic() + args.timeout_s
    chunks, cut_off = 0, None
    while report.messages < args.count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        count = min(args.chunk, args.count - report.messages)
        seed = chunk_seed(args.seed, chunks)
        try:
            part = wire.run(asyncio.wait_for(campaign(wire, targets, count, seed), left), timeout_s=left + 60)
        except TimeoutError:
            cut_off = {"chunk": chunks, "seed": seed, "cases": count}
            break
        merge(report, part)
        chunks += 1
        print(f"chunk {chunks}: {report.messages} cases, outcomes {dict(report.outcomes)}", file=sys.stderr)
    return {"chunks": chunks, "cut_off": cut_off}


def idle_after(wire: Wire, servers, targets: list[Target]) -> list[dict]:
    """Each peer's sessions and free cache once the raw client left (waiting up to IDLE_WAIT_S)."""
    found = []
    for server, target in zip(servers, targets, strict=True):
        deadline = time.monotonic() + IDLE_WAIT_S
        while True:
            info = wire.run(wire.info(target))
            idle = info["active_sessions"] == 0 and info["cache_tokens_left"] == server.config.cache_tokens
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        direct = wire.run(wire.info(target, "direct"))["type"] == "info"
        found.append({"span": list(target.span), "idle": idle, "active_sessions": info["active_sessions"],
                      "info_over_direct": direct, "forward": info["forward"]})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50000, help="malformed (and valid) cases to send")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="no chunk starts after this")
    parser.add_argument("--chunk", type=int, default=5000, help="cases per chunk of the campaign")
    parser.add_argument("--baseline-s", type=float, default=10.0, help="the healthy session alone, first")
    args = parser.parse_args()
    started = time.monotonic()
    path = make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="fuzz_wire.")) / "llama")
    swarm = InProcessSwarm()
    wire = client = None
    try:
        servers = swarm.start_peers(path, SPANS, model_id=MODEL_ID, **PEER_LIMITS)
        targets = [Target.of(s) for s in servers]
        wire = Wire(swarm.initial_peers)
        config = ClientConfig(initial_peers=tuple(swarm.initial_peers), model_id=MODEL_ID)
        client = DistributedModelForCausalLM.from_pretrained(path, client_config=config)
        expected = AutoModelForCausalLM.from_pretrained(path).eval().generate(
            PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

        with Healthy(client, PROMPT, expected) as alone:  # the baseline: nothing else on the peers
            baseline_started = time.monotonic()
            time.sleep(args.baseline_s)
        baseline_s = time.monotonic() - baseline_started

        report = Report()
        fuzz_started = time.monotonic()
        with PeerErrors() as errors, Healthy(client, PROMPT, expected) as healthy:
            chunks = run_chunks(wire, targets, args, report)
        fuzz_s = time.monotonic() - fuzz_started
        peers = idle_after(wire, servers, targets)
    finally:
        if client is not None:
            client.shutdown()
        if wire is not None:
            wire.close()
        swarm.close()

    alone_rate = alone.generations / baseline_s
    fuzzed_rate = healthy.generations / fuzz_s
    summary = {
        "messages": report.messages, "count": args.count, "seed": args.seed, **chunks,
        "outcomes": {k: report.outcomes.get(k, 0) for k in OUTCOMES},
        "silence": report.outcomes.get("silence", 0), "peer_death": report.outcomes.get("peer_death", 0),
        "by_worker": {w: dict(c) for w, c in sorted(report.by_worker.items())},
        "by_mutation": dict(report.by_mutation.most_common()),
        "info_checks": report.info_checks,
        "info_failures": report.info_failures[:10], "info_failure_count": len(report.info_failures), "silences": report.silences[:10], "deaths": report.deaths[:10],
        "peer_errors": errors.records[:10], "peer_error_count": len(errors.records),
        "healthy": {**healthy.as_dict(), "generations_per_s": round(fuzzed_rate, 2)},
        "healthy_baseline": {**alone.as_dict(), "generations_per_s": round(alone_rate, 2),
                             "wall_s": round(baseline_s, 1)},
        "healthy_rate_vs_baseline": round(fuzzed_rate / alone_rate, 3) if alone_rate else None,
        "peers_after": peers,
        "messages_per_s": round(report.messages / fuzz_s, 1), "fuzz_wall_s": round(fuzz_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    harmed = (summary["silence"] or summary["peer_death"] or errors.records or chunks["cut_off"]
              or healthy.mismatches or healthy.recoveries or healthy.errors or alone.mismatches
              or not all(p["idle"] and p["info_over_direct"] for p in peers))
    return 1 if harmed else 0


if __name__ == "__main__":
    sys.exit(main())
