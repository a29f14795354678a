"""Leaving gracefully (peer.drain): SIGTERM and spot-style notices drain a peer before it goes.

Fast part: the notice-URL poll against a local HTTP server, and DrainController's decisions with a stand-in
server (real SessionManager). Slow part (tier 3, real `swarm peer` processes on loopback, a raw client with
its own p2pd): after SIGTERM the DHT says draining with a deadline inside the grace, a new session is
refused with code "draining", an open session's next step is still right and carries `drain_deadline`,
and the peer exits 0 when that session closes; with a session left open it exits at the grace deadline;
the notice file and the notice URL start draining too; a second SIGTERM exits at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from client import loop
from client.launcher import LocalSwarm, Proc
from client.transport import HivemindTransport
from peer.config import PeerConfig
from peer.drain import DrainController, fetch_notice
from peer.sessions import SessionManager
from swarm.runtime import KVBudget
from swarm.runtime.cache import KVCache, KVPool
from swarm.errors import ConfigError
from swarm.protocol import (
    ERROR_DRAINING,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_MINOR,
    pack_tensor,
    read_message,
    unpack_tensor,
    write_message,
)
from swarm.spans import Span

MODEL_ID = "drain-llama"  # our own model id: no other module's peers in our records
BLOCKS = (0, 4)
REPLY_TIMEOUT_S = 10.0
LONG_GRACE_S = 60.0  # long enough that leaving "soon after the last session closed" is unmistakable
SHORT_GRACE_S = 3.0


# ---------------------------------------------------------------- a notice endpoint


class NoticeEndpoint:
    """A local stand-in for AWS's spot/instance-action: 404 until `body` is set, then 200 with it."""

    def __init__(self):
        self.body: bytes | None = None
        self.status_override: int | None = None
        self.gets = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                endpoint.gets += 1
                status = endpoint.status_override or (404 if endpoint.body is None else 200)
                body = endpoint.body if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/latest/meta-data/spot/instance-action"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    e = NoticeEndpoint()
    try:
        yield e
    finally:
        e.close()


def test_notice_url_poll_reads_aws_style_answers(endpoint):
    assert fetch_notice(endpoint.url, 2) is None  # 404: no notice
    endpoint.body = b""
    assert fetch_notice(endpoint.url, 2) is None  # 200 without a body is no notice either
    endpoint.body = b'{"action": "terminate", "time": "2030-01-01T00:00:00Z"}\n'
    assert fetch_notice(endpoint.url, 2) == '{"action": "terminate", "time": "2030-01-01T00:00:00Z"}'
    endpoint.status_override = 500
    with pytest.raises(OSError):  # the watcher logs it and polls again
        fetch_notice(endpoint.url, 2)
    port = endpoint.server.server_port
    endpoint.close()
    with pytest.raises(OSError):
        fetch_notice(f"http://127.0.0.1:{port}/", 2)


@pytest.mark.parametrize("fields", [
    {"drain_notice_url": "file:///etc/passwd"}, {"drain_notice_url": "169.254.169.254/latest"},
    {"drain_grace_s": -1.0}, {"drain_grace_s": float("nan")}, {"drain_notice_url_period_s": 0.0},
])
def test_drain_settings_are_validated(fields):
    with pytest.raises(ConfigError):
        PeerConfig(model_path="m", span=Span(0, 1), **fields)


# ---------------------------------------------------------------- DrainController with a stand-in server


class StandInServer:
    """What DrainController touches of a PeerServer: state, begin_drain, announcer, sessions."""

    def __init__(self, config: PeerConfig):
        self.state = "online"
        self.drain_deadline: float | None = None
        self.announced: list[str] = []
        budget = KVBudget(1 << 30)
        self.sessions = SessionManager(config, budget, 1, new_cache=lambda rows, length, blocks: KVCache(
            Span(*blocks), rows, length, 1, budget, KVPool(Span(*blocks), 1, 1, torch.float32, "cpu")),
            release=lambda cache: None)
        self.announcer = self

    def begin_drain(self, deadline: float) -> None:
        self.state, self.drain_deadline = "draining", deadline

    async def announce(self, state: str) -> None:
        self.announced.append(state)


def controlled(**fields) -> tuple[StandInServer, DrainController, list[str]]:
    config = PeerConfig(model_path="m", span=Span(0, 4), **fields)
    server, said = StandInServer(config), []
    return server, DrainController(server, config, clock=lambda: 1000.0, say=said.append), said


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_controller_drains_until_the_last_session_closes():
    async def scenario():
        server, drain, said = controlled(drain_grace_s=30)
        session = await server.sessions.open("client", (0, 4), 1, 8)
        leaving = asyncio.create_task(drain.run())
        drain.on_signal(signal.SIGTERM)
        await until(lambda: server.announced == ["draining"])
        assert server.state == "draining" and server.drain_deadline == 1030.0
        assert said == ["draining: leaving within 30 s (1 sessions open; notice: SIGTERM)"]
        assert not leaving.done()
        server.sessions.close(session)
        assert await asyncio.wait_for(leaving, 5) == "all sessions closed"

    asyncio.run(scenario())


def test_controller_sigint_leaves_without_draining():
    async def scenario():
        server, drain, said = controlled()
        await server.sessions.open("client", (0, 4), 1, 8)
        leaving = asyncio.create_task(drain.run())
        drain.on_signal(signal.SIGINT)
        assert await asyncio.wait_for(leaving, 5) == "SIGINT"
        assert server.state == "online" and server.announced == [] and said == []

    asyncio.run(scenario())


def test_controller_second_signal_or_grace_end_leaves_with_sessions_open():
    async def scenario(second: signal.Signals | None, grace_s: float) -> str:
        server, drain, _ = controlled(drain_grace_s=grace_s)
        await server.sessions.open("client", (0, 4), 1, 8)
        leaving = asyncio.create_task(drain.run())
        drain.notice("file /tmp/notice")
        await until(lambda: server.state == "draining")
        if second is not None:
            drain.on_signal(second)
        return await asyncio.wait_for(leaving, 5)

    assert asyncio.run(scenario(signal.SIGTERM, 60)) == "SIGTERM while draining"
    assert asyncio.run(scenario(signal.SIGINT, 60)) == "SIGINT while draining"
    started = time.monotonic()
    assert asyncio.run(scenario(None, 0.3)) == "grace period of 0.3 s over with 1 sessions open"
    assert 0.25 <= time.monotonic() - started < 3


def test_controller_drains_on_the_notice_url(endpoint):
    async def scenario():
        server, drain, said = controlled(drain_notice_url=endpoint.url, drain_notice_url_period_s=0.05)
        leaving = asyncio.create_task(drain.run())
        await until(lambda: endpoint.gets >= 2)
        assert server.state == "online"
        endpoint.body = b"terminate"
        assert await asyncio.wait_for(leaving, 5) == "all sessions closed"  # none were open
        assert server.announced == ["draining"] and f"notice: URL {endpoint.url}: terminate" in said[0]

    asyncio.run(scenario())


# ---------------------------------------------------------------- real peer processes


@dataclass
class Env:
    swarm: LocalSwarm
    transport: HivemindTransport
    hidden_size: int


@dataclass
class Peer:
    proc: Proc
    peer_id: str
    addrs: list[str]


@pytest.fixture(scope="module")
def env(tiny_model_path):
    path = tiny_model_path("llama", num_layers=4)
    hidden_size = json.loads((path / "config.json").read_text())["hidden_size"]
    with LocalSwarm(str(path)) as swarm:
        transport = loop.run(HivemindTransport.create(swarm.initial_peers), 60)
        try:
            yield Env(swarm, transport, hidden_size)
        finally:
            loop.run(transport.shutdown(), 30)


def start_peer(env: Env, *extra: str) -> Peer:
    proc = env.swarm.start_peer(f"{BLOCKS[0]}:{BLOCKS[1]}", extra=["--model-id", MODEL_ID, *extra])
    fields = dict(part.split("=", 1) for part in proc.ready_line.split()[1:])
    return Peer(proc, fields["peer_id"], fields["addrs"].split(","))


class RawSession:
    """One inference stream, spoken in raw protocol messages from the test thread (client.loop)."""

    def __init__(self, env: Env, peer: Peer):
        self.env, self.peer = env, peer
        self.reader, self.writer = loop.run(
            env.transport.open_stream(peer.peer_id, peer.addrs, INFERENCE_HANDLER, REPLY_TIMEOUT_S), 30
        )
        self.position = 0

    def ask(self, message: dict) -> dict:
        async def go():
            await write_message(self.writer, message)
            return await asyncio.wait_for(read_message(self.reader, 1 << 20), REPLY_TIMEOUT_S)

        return loop.run(go(), 30)

    def open(self) -> dict:
        return self.ask({
            "type": "open", "minor": PROTOCOL_MINOR, "model_id": MODEL_ID, "blocks": list(BLOCKS),
            "batch_size": 1, "max_length": 16,
        })

    def step(self, hidden: torch.Tensor) -> dict:
        """Send hidden [1, new, hidden_size] at the session's position; return the reply."""
        at, new = self.position, hidden.shape[1]
        reply = self.ask({
            "type": "step", "minor": PROTOCOL_MINOR, "step": at, "position": at,
            "hidden": pack_tensor(hidden),
            "position_ids": pack_tensor(torch.arange(at, at + new)[None]),
            "valid": pack_tensor(torch.ones(1, new, dtype=torch.bool)),
        })
        assert reply["type"] == "result", reply
        self.position += new
        return reply

    def close(self) -> None:
        async def go():
            try:
                await asyncio.wait_for(write_message(self.writer, {"type": "close"}), 5)
            except (ConnectionError, TimeoutError):
                pass  # the peer may already be gone
            finally:
                self.writer.close()

        loop.run(go(), 10)


def opened(env: Env, peer: Peer, steps: list[torch.Tensor] = ()) -> tuple[RawSession, list[dict]]:
    session = RawSession(env, peer)
    assert session.open()["type"] == "opened"
    return session, [session.step(hidden) for hidden in steps]


def info(env: Env, peer: Peer) -> dict:
    request = env.transport.request(peer.peer_id, peer.addrs, INFO_HANDLER, {"type": "info"}, REPLY_TIMEOUT_S)
    return loop.run(request, 30)


def record_of(env: Env, peer: Peer, state: str, timeout_s: float = 15.0):
    """The peer's DHT record for block 0 once it says `state` (fails after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        blocks = loop.run(env.transport.fetch_blocks(MODEL_ID, BLOCKS[1]), 30)
        record = blocks.get(0, {}).get(peer.peer_id)
        if record is not None and record.state == state:
            return record
        assert time.monotonic() < deadline, f"DHT record of {peer.peer_id} not {state!r} in time: {record}"
        time.sleep(0.1)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def line_starting(proc: Proc, prefix: str, timeout_s: float = 15.0) -> str:
    return proc.wait_line(lambda line: line.startswith(prefix), timeout_s)


def inputs(env: Env, tokens: int, seed: int) -> torch.Tensor:
    """Hidden states [1, tokens, hidden_size], reproducible by seed."""
    return torch.randn(1, tokens, env.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_sigterm_drains_open_sessions_then_exits_when_they_close(env):
    peer = start_peer(env, "--drain-grace-s", str(LONG_GRACE_S))
    prefill, decode = inputs(env, 3, seed=1), inputs(env, 1, seed=2)
    reference, expected = opened(env, peer, [prefill, decode])  # the same steps on a session before the drain
    reference.close()
    session, _ = opened(env, peer, [prefill])
    wait_for(lambda: info(env, peer)["active_sessions"] == 1, "the reference session closed on the peer")
    sent = time.time()
    peer.proc.kill(signal.SIGTERM)
    assert "(1 sessions open; notice: SIGTERM)" in line_starting(peer.proc, "draining: leaving within 60 s")

    record = record_of(env, peer, "draining")
    assert sent + LONG_GRACE_S - 1 <= record.drain_deadline <= time.time() + LONG_GRACE_S

    refused = RawSession(env, peer)
    try:
        reply = refused.open()
        assert reply["type"] == "error" and reply["code"] == ERROR_DRAINING and reply["fatal"] is True, reply
        assert "draining" in reply["message"] and "leaving the swarm in" in reply["message"], reply
    finally:
        refused.close()

    result = session.step(decode)  # the live session goes on, and is told in-band
    assert result["position"] == 4 and result["drain_deadline"] == record.drain_deadline
    # [1, 1, hidden]: what the same step gave before the drain
    out, reference_out = (unpack_tensor(r["hidden"], "hidden") for r in (result, expected[1]))
    assert torch.allclose(out, reference_out, atol=1e-5)
    about = info(env, peer)
    assert about["state"] == "draining" and about["drain_deadline"] == record.drain_deadline

    closed = time.monotonic()
    session.close()
    assert peer.proc.popen.wait(20) == 0, "".join(peer.proc.output)
    assert time.monotonic() - closed < 10, "the peer should leave soon after its last session, not at the end"
    assert "leaving (all sessions closed): announcing offline" in "".join(peer.proc.output)
    record_of(env, peer, "offline")


@pytest.mark.slow
def test_grace_deadline_ends_draining_with_a_session_left_open(env):
    peer = start_peer(env, "--drain-grace-s", str(SHORT_GRACE_S))
    session, _ = opened(env, peer, [inputs(env, 2, seed=3)])
    try:
        sent = time.monotonic()
        peer.proc.kill(signal.SIGTERM)
        line_starting(peer.proc, "draining:")
        assert "drain_deadline" in session.step(inputs(env, 1, seed=4))
        line = line_starting(peer.proc, "leaving", timeout_s=SHORT_GRACE_S + 10)
        waited = time.monotonic() - sent
        assert line.startswith("leaving (grace period of 3 s over with 1 sessions open)"), line
        assert SHORT_GRACE_S - 0.5 <= waited <= SHORT_GRACE_S + 5, waited
        assert peer.proc.popen.wait(20) == 0, "".join(peer.proc.output)
    finally:
        session.close()


@pytest.mark.slow
def test_notice_file_starts_draining(env, tmp_path):
    notice = tmp_path / "spot-termination-notice"
    peer = start_peer(env, "--drain-notice-file", str(notice), "--drain-grace-s", str(LONG_GRACE_S))
    session, _ = opened(env, peer, [inputs(env, 2, seed=5)])  # holds the peer in draining while we look
    try:
        assert info(env, peer)["state"] == "online" and "drain_deadline" not in info(env, peer)
        notice.write_text("terminate\n")
        written = time.time()
        line = line_starting(peer.proc, "draining:", timeout_s=10)
        assert f"notice: file {notice})" in line, line
        about = info(env, peer)
        assert about["state"] == "draining"
        assert written + LONG_GRACE_S - 5 <= about["drain_deadline"] <= time.time() + LONG_GRACE_S
    finally:
        session.close()
    assert peer.proc.popen.wait(20) == 0, "".join(peer.proc.output)


@pytest.mark.slow
def test_notice_url_starts_draining(env, endpoint):
    peer = start_peer(env, "--drain-notice-url", endpoint.url, "--drain-notice-url-period-s", "0.3")
    wait_for(lambda: endpoint.gets >= 2, "the peer polled the notice URL twice")  # 404 = "no notice"
    assert peer.proc.popen.poll() is None and info(env, peer)["state"] == "online"
    endpoint.body = b'{"action": "terminate", "time": "2030-01-01T00:00:00Z"}'
    line = line_starting(peer.proc, "draining:", timeout_s=10)
    assert f"notice: URL {endpoint.url}: " in line and "terminate" in line, line
    assert peer.proc.popen.wait(20) == 0, "".join(peer.proc.output)  # no sessions: it leaves at once
    assert "leaving (all sessions closed)" in "".join(peer.proc.output)


@pytest.mark.slow
def test_second_sigterm_while_draining_exits_at_once(env):
    peer = start_peer(env, "--drain-grace-s", str(LONG_GRACE_S))
    session, _ = opened(env, peer, [inputs(env, 2, seed=6)])
    try:
        peer.proc.kill(signal.SIGTERM)
        line_starting(peer.proc, "draining:")
        record_of(env, peer, "draining")
        again = time.monotonic()
        peer.proc.kill(signal.SIGTERM)
        assert peer.proc.popen.wait(20) == 0, "".join(peer.proc.output)
        assert time.monotonic() - again < 8, "a second SIGTERM must not wait for the session or the grace"
        assert "leaving (SIGTERM while draining): announcing offline" in "".join(peer.proc.output)
        record_of(env, peer, "offline")
    finally:
        session.close()
