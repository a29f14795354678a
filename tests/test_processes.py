"""The command line roles as a user runs them: real `swarm` processes on loopback.

Bootstrap identity, peers started at once, restart with the same identity after kill -9 (no orphaned
daemons), a client that starts before the peers, fast failure on missing blocks, offline on SIGINT,
and `swarm generate` streaming text.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.launcher import LocalSwarm, spawn
from swarm.errors import MissingBlocksError

pytestmark = pytest.mark.slow
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path("llama", num_layers=4)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def peer_id_of(line: str) -> str:
    return line.split("peer_id=")[1].split()[0]


def reference(model_path, new_tokens=8):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def client_for(model_path, swarm, **config):
    return DistributedModelForCausalLM.from_pretrained(
        model_path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers), **config)
    )


def assert_generates_reference(model_path, swarm) -> None:
    client = client_for(model_path, swarm)
    try:
        out = client.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out, reference(model_path))
    finally:
        client.shutdown()


def test_bootstrap_keeps_its_peer_id_across_restarts(tmp_path):
    identity = str(tmp_path / "bootstrap.id")
    ids = []
    for _ in range(2):
        proc = spawn("bootstrap", ["bootstrap", "--identity", identity])
        line = proc.wait_line(lambda l: l.startswith("/ip4/"), 60)
        assert "/tcp/" in line and "/p2p/" in line
        ids.append(line.strip().rsplit("/p2p/", 1)[1])
        assert proc.stop() == 0
    assert ids[0] == ids[1]


def test_two_peers_at_once_then_generate_equals_local(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peers(["0:2", "2:4"])
        assert_generates_reference(model_path, swarm)


def test_restart_with_same_identity_after_kill9_leaves_no_orphans(model_path, tmp_path):
    identity = str(tmp_path / "peer.id")
    with LocalSwarm(str(model_path)) as swarm:
        first = swarm.start_peer("0:4", extra=["--identity", identity])
        daemons = children_of(first.popen.pid)
        assert daemons, "the peer should run p2pd as its child"
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in daemons) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in daemons), "p2pd outlived its peer"
        second = swarm.start_peer("0:4", extra=["--identity", identity])
        assert peer_id_of(second.ready_line) == peer_id_of(first.ready_line)
        assert_generates_reference(model_path, swarm)


def test_client_started_before_peers_waits_for_them(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        client = client_for(model_path, swarm, wait_for_route_s=120)
        try:
            swarm.start_peer("0:4", wait=False)
            out = client.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(out, reference(model_path))
        finally:
            client.shutdown()


def test_missing_blocks_fail_fast_and_name_them(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peer("0:1")
        swarm.start_peer("3:4")
        client = client_for(model_path, swarm, wait_for_route_s=0)
        try:
            started = time.monotonic()
            with pytest.raises(MissingBlocksError) as error:
                client.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert error.value.missing == [1, 2]
            assert "1:3" in str(error.value)
            assert time.monotonic() - started < 15
        finally:
            client.shutdown()


def test_sigint_announces_offline(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        proc = swarm.start_peer("0:4")
        peer_id = peer_id_of(proc.ready_line)
        client = client_for(model_path, swarm)
        try:
            assert proc.stop() == 0
            assert "offline" in "".join(proc.output)

            async def state():
                transport = await client.transport()
                return (await transport.fetch_blocks(client.model_id, 4))[0][peer_id].state

            assert loop.run(state(), 30) == "offline"
        finally:
            client.shutdown()


def test_ctrl_c_in_a_terminal_stops_a_peer_cleanly(model_path):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group. p2pd runs in a group of its
    own, so the peer, not p2pd, decides when p2pd stops: it announces "offline" through it first."""
    with LocalSwarm(str(model_path)) as swarm:
        proc = swarm.start_peer("0:4", new_session=True)
        peer_id = peer_id_of(proc.ready_line)
        daemons = children_of(proc.popen.pid)
        assert daemons and all(os.getpgid(d) != os.getpgid(proc.popen.pid) for d in daemons)
        client = client_for(model_path, swarm)
        try:
            os.killpg(proc.popen.pid, signal.SIGINT)
            assert proc.popen.wait(20) == 0, "".join(proc.output)
            assert "announcing offline" in "".join(proc.output)

            async def state():
                transport = await client.transport()
                return (await transport.fetch_blocks(client.model_id, 4))[0][peer_id].state

            assert loop.run(state(), 30) == "offline"
            time.sleep(0.5)
            assert not any(alive(d) for d in daemons)
        finally:
            client.shutdown()


def test_a_bootstrap_whose_p2pd_died_still_exits_on_sigint(tmp_path):
    """hivemind waits forever for answers from a dead p2pd; leaving is bounded anyway."""
    bootstrap = spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1"], new_session=True)
    try:
        bootstrap.wait_line(lambda line: line.startswith("/ip4/"), 60)
        (daemon,) = children_of(bootstrap.popen.pid)
        os.kill(daemon, signal.SIGKILL)
        time.sleep(0.5)
        os.killpg(bootstrap.popen.pid, signal.SIGINT)
        assert bootstrap.popen.wait(30) == 0, "".join(bootstrap.output)
    finally:
        bootstrap.kill()


def test_generate_cli_streams_text(model_path):
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peer("0:4")
        proc = spawn("generate", ["generate", "--model", str(model_path), "--initial-peers", *swarm.initial_peers,
                                  "--prompt", "The swarm", "--max-new-tokens", "12"])
        assert proc.popen.wait(120) == 0, "".join(proc.output)
        text = "".join(proc.output)
        assert text.startswith("The swarm") and len(text.strip()) > len("The swarm")
        # the first and last blocks on the client (the swarm runs blocks 1:3 only): the same text
        private = spawn("generate", ["generate", "--model", str(model_path), "--initial-peers", *swarm.initial_peers,
                                     "--prompt", "The swarm", "--max-new-tokens", "12", "--local-blocks", "1,1"])
        assert private.popen.wait(120) == 0, "".join(private.output)
        assert "".join(private.output) == text
