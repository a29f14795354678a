"""A real local swarm for tests, demos and benchmarks: bootstrap and peers as `swarm` processes on loopback.

Readiness is read from each process's stdout (the bootstrap's multiaddr lines, the peer's `ready` line),
never guessed with sleeps. Every process is killed on close, whatever state it is in.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

SWARM = [sys.executable, "-m", "swarm.cli"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    lines: queue.Queue = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, predicate, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no expected line within {timeout_s} s; output:\n{''.join(self.output)}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.popen.wait()}) before ready; output:\n{''.join(self.output)}")
            if predicate(line):
                return line

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def spawn(name: str, args: list[str], env: dict | None = None) -> Proc:
    popen = subprocess.Popen(
        SWARM + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    proc = Proc(name, popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


class LocalSwarm:
    """Bootstrap node + peers on loopback. Use as a context manager."""

    def __init__(self, model_path: str, *, startup_timeout_s: float = 120):
        self.model_path = model_path
        self.timeout_s = startup_timeout_s
        self.procs: list[Proc] = []
        self.bootstrap = spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1"])
        self.procs.append(self.bootstrap)
        self.initial_peers = [self.bootstrap.wait_line(lambda l: l.startswith("/ip4/"), self.timeout_s).strip()]
        self.peers: dict[str, Proc] = {}

    def start_peer(self, blocks: str, name: str | None = None, extra: list[str] = (), wait: bool = True) -> Proc:
        name = name or f"peer{len(self.peers)}[{blocks}]"
        proc = spawn(name, ["peer", "--model", self.model_path, "--blocks", blocks,
                            "--initial-peers", *self.initial_peers, *extra])
        self.procs.append(proc)
        self.peers[name] = proc
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc) -> str:
        line = proc.wait_line(lambda l: l.startswith("ready"), self.timeout_s)
        proc.ready_line = line
        return line

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessSwarm:
    """Bootstrap node and PeerServers on one event loop in a background thread of this process.

    Real p2pd daemons and real DHT nodes, but no Python start-up per peer, so the family matrix stays
    cheap. Peers are the same PeerServer objects `swarm peer` runs.
    """

    def __init__(self):
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inprocess-swarm", daemon=True)
        self._thread.start()
        self.servers = []
        self._bootstrap = self._run(self._start_bootstrap())

    def _run(self, coro, timeout_s: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start_bootstrap(self):
        from swarm import records
        from swarm.identity import Identity
        from swarm.net import NodeSettings, start_dht, start_p2p, visible_maddrs

        identity = Identity.load_or_create(None)
        settings = NodeSettings(identity_path=identity.p2pd_identity_path)
        p2p = await start_p2p(settings)
        identity.close()
        dht = await start_dht(p2p, settings, records.make_record_validator(identity))
        self.initial_peers = await visible_maddrs(p2p)
        return p2p, dht

    def start_peers(self, model_path, spans: list[str], **config_fields) -> list:
        """Start peers for these spans concurrently; returns their PeerServers once all are online."""
        import asyncio

        from peer.config import PeerConfig
        from peer.server import PeerServer
        from swarm.spans import Span

        servers = [
            PeerServer(PeerConfig(model_path=str(model_path), span=Span.parse(s),
                                  initial_peers=tuple(self.initial_peers), **config_fields))
            for s in spans
        ]

        async def start_all():
            await asyncio.gather(*(s.start() for s in servers))

        self._run(start_all())
        self.servers.extend(servers)
        return servers

    def stop_peer(self, server) -> None:
        self._run(server.shutdown())
        self.servers.remove(server)

    def close(self) -> None:
        import asyncio

        async def stop_all():
            await asyncio.gather(*(s.shutdown() for s in self.servers), return_exceptions=True)
            p2p, dht = self._bootstrap
            await dht.shutdown()
            await p2p.shutdown()

        try:
            self._run(stop_all(), timeout_s=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
