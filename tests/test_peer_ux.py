"""What a volunteer sees from `swarm peer`: memory stated before loading, progress, the online status
line, and errors that say what to do (wrong model path, port in use, bootstrap unreachable, too big)."""

from __future__ import annotations

import socket
import time

import pytest

from client.launcher import LocalSwarm, spawn
from peer.memory import check_fits, describe
from swarm.errors import ConfigError
from swarm.runtime.loading import SpanMemory
from swarm.spans import Span

GiB = 1 << 30


def test_memory_check_gives_a_span_that_fits():
    memory = SpanMemory(weights_bytes=16 * GiB, kv_bytes_per_token=32 * 1024)
    check_fits(memory, Span(0, 32), 2 * GiB, "cuda:0", free=40 * GiB)
    with pytest.raises(ConfigError) as error:
        check_fits(memory, Span(0, 32), 2 * GiB, "cuda:0", free=8 * GiB)
    text = str(error.value)
    assert "not enough memory" in text and "8.0 GiB free" in text and "--blocks 0:" in text
    fitting = int(text.split("--blocks 0:")[1].split(")")[0])
    assert 0 < fitting < 32
    assert "16.0 GiB of weights + up to 2.0 GiB of KV cache (65536 token slots)" in describe(
        memory, Span(0, 32), 2 * GiB, "cuda:0", 40 * GiB
    )
    assert "KV cache in most of the memory left" in describe(memory, Span(0, 32), None, "cuda:0", 40 * GiB)


def run_peer(args: list[str], timeout_s: float = 90) -> str:
    proc = spawn("peer", ["peer", *args])
    code = proc.popen.wait(timeout_s)
    assert code == 1, "".join(proc.output)
    return "".join(proc.output)


def test_wrong_model_path_says_what_to_pass(tmp_path):
    out = run_peer(["--model", str(tmp_path / "nope"), "--blocks", "0:1", "--initial-peers", "/ip4/127.0.0.1/tcp/1"])
    assert "no config.json" in out and "--model must be a Hugging Face checkpoint folder" in out


@pytest.mark.slow
def test_port_in_use_and_unreachable_bootstrap(tiny_model_path):
    model = str(tiny_model_path("llama", num_layers=4))
    with socket.socket() as busy, LocalSwarm(model) as swarm:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_peer(["--model", model, "--blocks", "0:2", "--initial-peers", *swarm.initial_peers,
                        "--port", str(port)])
        assert f"port {port} on 127.0.0.1 is in use; pick another --port" in out
        assert "loading" in out and "KV cache" in out  # the memory line comes before any failure
    dead = "/ip4/127.0.0.1/tcp/1/p2p/QmWSFAYbgbopAie6MzP7Lujw4dXndjYwj8ZZPWLJFy1tBP"
    started = time.monotonic()
    out = run_peer(["--model", model, "--blocks", "0:2", "--initial-peers", dead, "--join-timeout-s", "8"])
    assert time.monotonic() - started < 60, "the join timeout was not kept"
    assert "could not reach the initial peers" in out and "check the addresses" in out


@pytest.mark.slow
def test_online_status_line(tiny_model_path):
    model = str(tiny_model_path("llama", num_layers=4))
    with LocalSwarm(model) as swarm:
        (proc,) = swarm.start_peers(["0:4"])
        line = proc.wait_line(lambda l: l.startswith("online:"), 30)
        assert "serving blocks 0:4" in line and "tokens/s per block" in line
        assert any("Loading weights" in l or "Reading tensors" in l for l in proc.output)
