"""Many separate clients against small KV budgets (used by tests/test_overload.py and
benchmarks/bench_overload.py).

Each client is its own `DistributedModelForCausalLM` (its own p2pd, so its own peer id, as a separate
user's machine would be), in its own thread, and generates greedily from its own prompt with
`generate(max_new_tokens=...)` in an `inference_session` of max_length = prompt + new tokens, which is
what every peer is told. All
clients start at once. Every outcome is one of:

  completed  the tokens equal local transformers' greedy tokens for that prompt;
  refused    the client was told before its first token (SessionError or PeerError raised with no token
             generated): the clear refusal up front that admission promises;
  unrouted   no route before the first token (RoutingError: the DHT had no records for some block);
  failed     anything else: an error after tokens came, or tokens that differ from the reference.

Each client's transport (its p2pd and DHT node) starts before the crowd does, one after another, as
separate users' machines would have theirs: a hundred daemons starting at once on two cores is a test
of the machine, not of admission.

`moved` counts clients whose route changed mid-generation (`InferenceSession.recoveries`); the worst
step latency is the longest gap between two consecutive tokens of one client (the first token, which
includes waiting for admission, is reported apart as time to first token).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, loop
from swarm.errors import PeerError, RoutingError, SessionError


class _Clock(BaseStreamer):
    """Stamps each new token (generate's first `put` is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.stamps.append(time.monotonic())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@dataclass
class Outcome:
    status: str = "failed"  # completed | refused | unrouted | failed
    moved: bool = False
    started_s: float = 0.0
    stamps: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return self.stamps[0] - self.started_s if self.stamps else None

    @property
    def worst_step_s(self) -> float | None:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return max(gaps) if gaps else None


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=generator) for _ in range(n)]


def references(model_path, prompts_: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    batch = torch.cat(prompts_)  # equal lengths: one local generate, no padding
    out = local.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return [row[None] for row in out]


def run_clients(model_path, initial_peers: list[str], prompts_: list[torch.Tensor], expected: list[torch.Tensor],
                new_tokens: int, client_fields: dict | None = None, timeout_s: float = 600) -> list[Outcome]:
    """Start len(prompts_) clients, let them all generate at once, return their outcomes in order."""
    config = ClientConfig(initial_peers=tuple(initial_peers), **(client_fields or {}))
    clients = [DistributedModelForCausalLM.from_pretrained(model_path, client_config=config) for _ in prompts_]
    outcomes = [Outcome() for _ in prompts_]
    gate = threading.Barrier(len(prompts_) + 1)

    def generate(k: int) -> None:
        clock, outcome = _Clock(), outcomes[k]
        try:
            gate.wait(timeout_s)
            outcome.started_s = time.monotonic()
            with clients[k].inference_session(max_length=prompts_[k].shape[1] + new_tokens) as session:
                try:
                    out = clients[k].generate(prompts_[k], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=0, streamer=clock)
                finally:
                    outcome.moved = session.recoveries > 0
            outcome.status = "completed" if torch.equal(out, expected[k]) else "failed"
            if outcome.status == "failed":
                outcome.error = "tokens differ from the reference"
        except (SessionError, PeerError, RoutingError) as e:
            if not clock.stamps:
                outcome.status = "unrouted" if isinstance(e, RoutingError) else "refused"
            outcome.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # reported in the outcome; the test or benchmark decides
            outcome.error = f"{type(e).__name__}: {e}"
        finally:
            outcome.stamps = clock.stamps

    threads = [threading.Thread(target=generate, args=(k,), daemon=True) for k in range(len(prompts_))]
    try:
        for client in clients:
            loop.run(client.transport(), timeout_s)
        for thread in threads:
            thread.start()
        gate.wait(timeout_s)
        for thread in threads:
            thread.join(timeout_s)
    finally:
        for client in clients:
            client.shutdown()
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    """Counts and latencies (ms) over the outcomes: what bench_overload prints and the test checks."""
    counts = {status: sum(o.status == status for o in outcomes)
              for status in ("completed", "refused", "unrouted", "failed")}
    steps = [o.worst_step_s for o in outcomes if o.worst_step_s is not None]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return {
        "clients": len(outcomes), **counts, "moved": sum(o.moved for o in outcomes),
        "worst_step_ms": round(max(steps) * 1000, 1) if steps else None,
        "worst_ttft_ms": round(max(ttfts) * 1000, 1) if ttfts else None,
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }
