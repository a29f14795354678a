"""Failover scenarios (tier 3), each on a real multi-process swarm: several failures in one generation,
a replacement dying while it is rebuilt, no route at all, a vanished client, a session too long."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.launcher import LocalSwarm
from client.session import InferenceSession
from swarm.errors import MissingBlocksError, SessionError
from swarm.protocol import INFO_HANDLER

pytestmark = pytest.mark.slow
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path("qwen3", num_layers=4)


@pytest.fixture(scope="module")
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(PROMPT, max_new_tokens=16, **GREEDY)


def make_client(model_path, swarm, **config):
    config.setdefault("step_timeout_s", 3.0)
    return DistributedModelForCausalLM.from_pretrained(
        model_path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers), **config)
    )


def proc_of(procs, peer_id):
    return next(p for p in procs if peer_id in p.ready_line)


class AtSteps(BaseStreamer):
    def __init__(self, actions: dict):
        self.actions, self.calls = actions, 0

    def put(self, value):
        self.calls += 1
        if self.calls - 1 in self.actions:  # call 1 is the prompt, call k + 1 is token k
            self.actions[self.calls - 1]()

    def end(self):
        pass


def test_two_failures_in_one_generation(model_path, expected):
    with LocalSwarm(str(model_path)) as swarm:
        procs = swarm.start_peers(["0:4", "0:2", "2:4", "0:2", "2:4"])
        client = make_client(model_path, swarm)
        killed = []

        def kill_first_hop():
            hop = client.active_session.route[0]
            killed.append(hop.peer_id)
            proc_of(procs, hop.peer_id).kill(signal.SIGKILL)

        try:
            with client.inference_session(max_length=32) as session:
                out = client.generate(PROMPT, max_new_tokens=16, streamer=AtSteps({3: kill_first_hop, 9: kill_first_hop}),
                                      **GREEDY)
                assert session.recoveries == 2
                assert not set(killed) & {h.peer_id for h in session.route}
            assert torch.equal(out, expected)
        finally:
            client.shutdown()


def test_replacement_dies_while_being_rebuilt(model_path, expected, monkeypatch):
    with LocalSwarm(str(model_path)) as swarm:
        procs = swarm.start_peers(["0:4", "0:4", "0:4"])
        client = make_client(model_path, swarm)
        original = InferenceSession._replay
        victims = []

        async def replay_but_kill_first(self, hops, kept):
            if kept is not None and not victims:  # the first rebuild: its new peer dies before the replay
                victims.append(hops[0].peer_id)
                proc_of(procs, hops[0].peer_id).kill(signal.SIGKILL)
            return await original(self, hops, kept)

        monkeypatch.setattr(InferenceSession, "_replay", replay_but_kill_first)
        try:
            with client.inference_session(max_length=32) as session:
                first = {}

                def kill_route():
                    first["peer"] = session.route[0].peer_id
                    proc_of(procs, first["peer"]).kill(signal.SIGKILL)

                out = client.generate(PROMPT, max_new_tokens=16, streamer=AtSteps({5: kill_route}), **GREEDY)
                survivors = {h.peer_id for h in session.route}
            assert victims and not survivors & {victims[0], first["peer"]}
            assert torch.equal(out, expected)
        finally:
            client.shutdown()


def test_no_route_waits_then_names_missing_blocks(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        procs = swarm.start_peers(["0:2", "2:4"])
        client = make_client(model_path, swarm, wait_for_route_s=3.0)
        try:
            with client.inference_session(max_length=32) as session:
                def kill_second():
                    proc_of(procs, session.route[1].peer_id).kill(signal.SIGKILL)

                started = time.monotonic()
                with pytest.raises(MissingBlocksError) as error:
                    client.generate(PROMPT, max_new_tokens=16, streamer=AtSteps({4: kill_second}), **GREEDY)
                waited = time.monotonic() - started
            assert error.value.missing == [2, 3]
            assert 3.0 <= waited < 30
        finally:
            client.shutdown()


def test_session_longer_than_peer_limit_is_a_clear_error(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peers(["0:4"], extra=["--max-session-length", "16"])
        client = make_client(model_path, swarm, wait_for_route_s=1.0)
        try:
            with pytest.raises(SessionError, match="exceeds this peer's limit of 16"):
                client.generate(PROMPT, max_new_tokens=16, **GREEDY)
        finally:
            client.shutdown()


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from client import ClientConfig, DistributedModelForCausalLM
    model = DistributedModelForCausalLM.from_pretrained(sys.argv[1], client_config=ClientConfig(initial_peers=tuple(sys.argv[2:])))
    session = model.inference_session(max_length=64)
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    print("generated", flush=True)
    time.sleep(600)
""")


def test_vanished_client_frees_the_peer_cache(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        (proc,) = swarm.start_peers(["0:4"])
        peer_id = proc.ready_line.split("peer_id=")[1].split()[0]
        addrs = proc.ready_line.split("addrs=")[1].split()[0].split(",")
        observer = make_client(model_path, swarm)

        def info():
            async def ask():
                transport = await observer.transport()
                return await transport.request(peer_id, addrs, INFO_HANDLER, {"type": "info"}, 10)

            return loop.run(ask(), 30)

        idle = info()["cache_tokens_left"]
        child = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(model_path), *swarm.initial_peers],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "generated"
            busy = info()
            assert busy["active_sessions"] == 1 and busy["cache_tokens_left"] < idle
            child.kill()
            child.wait(10)
            deadline = time.monotonic() + 20
            while info()["active_sessions"] and time.monotonic() < deadline:
                time.sleep(0.2)
            after = info()
            assert after["active_sessions"] == 0 and after["cache_tokens_left"] == idle
        finally:
            child.kill()
            observer.shutdown()
