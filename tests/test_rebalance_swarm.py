"""Block selection and rebalancing with real `swarm peer` processes on loopback (tier 2/3).

- Three peers started at the same instant without --blocks spread over the model (joining announced
  before loading, jittered re-read), and a generation through them equals local transformers' greedy one.
- A peer that chose its span moves once the swarm needs it elsewhere: while a generation is in the middle
  of a session on it, it drains (announced with its destination), the session moves off it at a step
  boundary, it loads the new span and announces it; the generated tokens equal the local reference and
  the peer's `info` then shows the new span, online.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.launcher import LocalSwarm, Proc, spawn
from client.transport import HivemindTransport
from swarm.protocol import INFO_HANDLER

pytestmark = pytest.mark.slow
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path("llama", num_layers=4)


@pytest.fixture(scope="module")
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(PROMPT, max_new_tokens=NEW_TOKENS, **GREEDY)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Every peer process of the test shares one fresh throughput cache (the first one measures)."""
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def start_auto_peer(swarm: LocalSwarm, name: str, *extra: str) -> Proc:
    """`swarm peer` without --blocks (LocalSwarm.start_peer always passes a span)."""
    proc = spawn(
        name,
        [
            "peer",
            "--model",
            swarm.model_path,
            "--initial-peers",
            *swarm.initial_peers,
            *swarm.peer_args,
            *extra,
        ],
    )
    swarm.procs.append(proc)
    swarm.peers[name] = proc
    return proc


def ready_fields(swarm: LocalSwarm, proc: Proc) -> dict[str, str]:
    return dict(part.split("=", 1) for part in swarm.wait_ready(proc).split()[1:])


def client_for(model_path, swarm: LocalSwarm, model_id: str) -> DistributedModelForCausalLM:
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), model_id=model_id, step_timeout_s=10.0)
    return DistributedModelForCausalLM.from_pretrained(model_path, client_config=config)


class AtToken(BaseStreamer):
    """Runs `action` once, when generate hands over token `k` (call 1 is the prompt)."""

    def __init__(self, k: int, action):
        self.k, self.action, self.calls = k, action, 0

    def put(self, value):
        self.calls += 1
        if self.calls - 1 == self.k:
            self.action()

    def end(self):
        pass


def test_peers_started_together_spread_over_the_model(model_path, expected, cache_dir):
    with LocalSwarm(str(model_path)) as swarm:
        procs = [
            start_auto_peer(
                swarm,
                f"auto{i}",
                "--num-blocks",
                "2",
                "--model-id",
                "spread",
                "--join-jitter-s",
                "2",
                "--rebalance-period-s",
                "0",
                "--network-probe-period-s",
                "1",
            )
            for i in range(3)
        ]
        ready = [ready_fields(swarm, p) for p in procs]
        spans = sorted(fields["blocks"] for fields in ready)
        assert set(spans) == {"0:2", "2:4"}, spans  # covered, and the third is a replica of either half
        assert json.loads((cache_dir / "throughput.json").read_text())["entries"]  # measured once, cached
        client = client_for(model_path, swarm, "spread")
        transport = loop.run(HivemindTransport.create(swarm.initial_peers), 60)
        try:
            assert torch.equal(client.generate(PROMPT, max_new_tokens=NEW_TOKENS, **GREEDY), expected)
            # every peer measured round trips to its neighbours and announces them on its next heartbeat
            deadline = time.monotonic() + 30
            while True:
                found = loop.run(transport.fetch_blocks("spread", 4), 30)
                announced = {pid: r.rtt_ms for block in found.values() for pid, r in block.items()}
                if len(announced) == 3 and all(rtt is not None for rtt in announced.values()):
                    break
                assert time.monotonic() < deadline, f"round trips not announced in time: {announced}"
                time.sleep(0.5)
            assert all(0 < rtt < 5000 for rtt in announced.values()), announced
            info = loop.run(
                transport.request(
                    ready[0]["peer_id"], ready[0]["addrs"].split(","), INFO_HANDLER, {"type": "info"}, 10
                ),
                30,
            )
            assert (
                info["throughput"]["network"]["samples"] >= 1 and info["throughput"]["compute_tokens_s"] > 0
            )
        finally:
            client.shutdown()
            loop.run(transport.shutdown(), 30)


def wait_line(proc: Proc, prefix: str, timeout_s: float) -> str:
    return proc.wait_line(lambda line: line.startswith(prefix), timeout_s)


def start_mover(swarm: LocalSwarm, model_id: str) -> tuple[Proc, dict[str, str]]:
    """A peer on 2:4, then a peer without --blocks (it takes 0:2, where nobody is) that checks every ~2 s
    whether to move."""
    swarm.start_peer("2:4", extra=["--model-id", model_id])
    mover = start_auto_peer(
        swarm,
        "mover",
        "--model-id",
        model_id,
        "--num-blocks",
        "2",
        "--rebalance-period-s",
        "2",
        "--rebalance-delay-s",
        "0.5",
        "--rebalance-margin",
        "0.2",
        "--drain-grace-s",
        "30",
    )
    fields = ready_fields(swarm, mover)
    assert fields["blocks"] == "0:2"  # the blocks nobody served
    return mover, fields


def test_a_peer_moves_while_a_session_runs_on_it(model_path, expected, cache_dir):
    model_id = "moving"
    with LocalSwarm(str(model_path)) as swarm:
        common = ["--model-id", model_id]
        mover, fields = start_mover(swarm, model_id)
        client = client_for(model_path, swarm, model_id)
        transport = loop.run(HivemindTransport.create(swarm.initial_peers), 60)
        try:

            def crowd_its_blocks():
                # two more peers on 0:2: the mover is now worth more on 2:4, and moves with our session on it
                assert session.route[0].peer_id == fields["peer_id"]
                swarm.start_peers(["0:2", "0:2"], extra=common)
                line = wait_line(mover, "moving: draining blocks 0:2 (1 sessions open), then loading 2:4", 30)
                assert line

            with client.inference_session(max_length=32) as session:
                out = client.generate(
                    PROMPT, max_new_tokens=NEW_TOKENS, streamer=AtToken(3, crowd_its_blocks), **GREEDY
                )
                assert session.recoveries >= 1 and fields["peer_id"] not in {
                    h.peer_id for h in session.route[:1]
                }
            assert torch.equal(out, expected)

            wait_line(mover, "online: serving blocks 2:4", 60)
            info = loop.run(
                transport.request(
                    fields["peer_id"], fields["addrs"].split(","), INFO_HANDLER, {"type": "info"}, 10
                ),
                30,
            )
            assert info["span"] == [2, 4] and info["state"] == "online", info
            deadline = time.monotonic() + 15
            while True:  # the DHT says so too
                record = loop.run(transport.fetch_blocks(model_id, 4), 30)[2].get(fields["peer_id"])
                if record is not None and record.state == "online":
                    break
                assert time.monotonic() < deadline, f"no online record of the mover on block 2: {record}"
                time.sleep(0.2)
            assert (record.start, record.end) == (2, 4)
            # and a new generation runs through the new layout, still exact
            assert torch.equal(client.generate(PROMPT, max_new_tokens=NEW_TOKENS, **GREEDY), expected)
        finally:
            client.shutdown()
            loop.run(transport.shutdown(), 30)


def test_sigterm_during_a_move_drains_and_leaves_instead(model_path, expected, cache_dir):
    model_id = "leaving-mover"
    with LocalSwarm(str(model_path)) as swarm:
        mover, fields = start_mover(swarm, model_id)
        client = client_for(model_path, swarm, model_id)
        try:

            def crowd_then_terminate():
                swarm.start_peers(["0:2", "0:2"], extra=["--model-id", model_id])
                wait_line(mover, "moving: draining blocks 0:2 (1 sessions open)", 30)
                mover.kill(signal.SIGTERM)
                wait_line(mover, "draining: leaving within 30 s", 10)

            with client.inference_session(max_length=32):
                out = client.generate(
                    PROMPT, max_new_tokens=NEW_TOKENS, streamer=AtToken(3, crowd_then_terminate), **GREEDY
                )
            assert torch.equal(out, expected)
            assert mover.popen.wait(30) == 0
            output = "".join(mover.output)
            assert "leaving (all sessions closed)" in output and "after moving" not in output, output
        finally:
            client.shutdown()
