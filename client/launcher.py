"""Start a local swarm as real `swarm` processes on loopback: used by `swarm demo`, tests and benchmarks.

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


def spawn(name: str, args: list[str], env: dict | None = None, new_session: bool = False) -> Proc:
    """`new_session`: its own process group, as a command started in a terminal has (signal it with killpg)."""
    popen = subprocess.Popen(
        SWARM + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=new_session,
    )
    proc = Proc(name, popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


class LocalSwarm:
    """Bootstrap node + peers on loopback. Use as a context manager."""

    def __init__(self, model_path: str, *, startup_timeout_s: float = 180, peer_threads: int | None = 1,
                 bootstrap_args: list[str] = (), swarm_key_path: str | None = None):
        """`swarm_key_path`: a private swarm, its bootstrap and every peer started with that key file."""
        self.model_path = model_path
        key_args = ["--swarm-key", str(swarm_key_path)] if swarm_key_path else []
        # several peers share this machine's cores: one torch thread each avoids spinning thread pools
        self.peer_args = (["--num-threads", str(peer_threads)] if peer_threads else []) + key_args
        self.timeout_s = startup_timeout_s
        self.procs: list[Proc] = []
        self.bootstrap = spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1", *key_args, *bootstrap_args])
        self.procs.append(self.bootstrap)
        self.initial_peers = [self.bootstrap.wait_line(lambda l: l.startswith("/ip4/"), self.timeout_s).strip()]
        self.health_url = None
        if "--health-port" in bootstrap_args:
            line = self.bootstrap.wait_line(lambda l: l.startswith("health page at "), self.timeout_s)
            self.health_url = line.removeprefix("health page at ").strip()
        self.peers: dict[str, Proc] = {}

    def start_peer(self, blocks: str, name: str | None = None, extra: list[str] = (), wait: bool = True,
                   new_session: bool = False) -> Proc:
        name = name or f"peer{len(self.peers)}[{blocks}]"
        proc = spawn(name, ["peer", "--model", self.model_path, "--blocks", blocks,
                            "--initial-peers", *self.initial_peers, *self.peer_args, *extra], new_session=new_session)
        self.procs.append(proc)
        self.peers[name] = proc
        if wait:
            self.wait_ready(proc)
        return proc

    def start_peers(self, spans: list[str], extra: list[str] = ()) -> list[Proc]:
        """Start several peers at once and wait until every one is ready."""
        procs = [self.start_peer(span, extra=extra, wait=False) for span in spans]
        for proc in procs:
            self.wait_ready(proc)
        return procs

    def wait_ready(self, proc: Proc) -> str:
        line = proc.wait_line(lambda l: l.startswith("ready"), self.timeout_s)
        proc.ready_line = line
        return line

    def close(self) -> None:
        # SIGINT: leave now (announce offline); SIGTERM would drain open sessions for the grace period
        for proc in reversed(self.procs):
            proc.kill(signal.SIGCONT)
            proc.kill(signal.SIGINT)
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
