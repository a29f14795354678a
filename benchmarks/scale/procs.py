"""Processes of the scale harness: started inside a namespace, their lines timestamped as they come.

`ip netns exec NS CMD` enters the namespace and execs CMD (no fork without -all), so the pid we hold
is the command's own: a kill -9 of it is a kill -9 of the peer. Every process gets a parent-death signal
(it survives the exec), so it dies with the harness however the harness ends; start them from the main
thread (the signal follows the thread that forked). The namespaces themselves go through
benchmarks.scale.netns.cleanup, which the harness's reaper also runs after a kill -9.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the forked child, before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """One started process: stdout+stderr lines with the wall time each arrived; JSON lines as events."""

    def __init__(self, name: str, netns: str, argv: list[str], env: dict | None = None, log_path: str | None = None):
        self.name = name
        self.netns = netns
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=_die_with_parent,
        )
        self.started_at = time.time()
        self.lines: list[tuple[float, str]] = []
        self.events: list[dict] = []
        self.changed = threading.Condition()
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed by the pump)
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{name}").start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        for line in self.popen.stdout:
            now = time.time()
            if self._log:
                self._log.write(f"{now:.3f} {line}")
                self._log.flush()
            event = None
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            with self.changed:
                self.lines.append((now, line.rstrip("\n")))
                if isinstance(event, dict) and "event" in event:
                    self.events.append(event)
                self.changed.notify_all()
        if self._log:
            self._log.close()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout_s: float, what: str):
        """Wait until predicate() (called under the lock) is truthy; returns it. Raises on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = predicate()
                if found:
                    return found
                if self.popen.poll() is not None:
                    tail = "\n".join(line for _, line in self.lines[-20:])
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {what}:\n{tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(line for _, line in self.lines[-20:])
                    raise TimeoutError(f"{self.name}: no {what} within {timeout_s} s:\n{tail}")
                self.changed.wait(min(left, 1.0))

    def wait_line(self, prefix: str, timeout_s: float) -> tuple[float, str]:
        return self.wait_for(lambda: next(((t, l) for t, l in self.lines if l.startswith(prefix)), None),
                             timeout_s, f"line starting {prefix!r}")

    def first_line(self, prefix: str) -> tuple[float, str] | None:
        with self.changed:
            return next(((t, l) for t, l in self.lines if l.startswith(prefix)), None)

    def lines_starting(self, prefix: str) -> list[tuple[float, str]]:
        with self.changed:
            return [(t, l) for t, l in self.lines if l.startswith(prefix)]

    def events_of(self, kind: str) -> list[dict]:
        with self.changed:
            return [e for e in self.events if e["event"] == kind]

    def send(self, command: str) -> None:
        try:
            self.popen.stdin.write(command + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        return self.popen.poll() is None


def stop_all(procs: list[Proc], timeout_s: float = 10.0) -> None:
    """SIGINT to every live process (peers announce offline and leave), then SIGKILL what is left."""
    for proc in procs:
        proc.signal(signal.SIGCONT)
        proc.signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.signal(signal.SIGKILL)
    for proc in procs:
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def memory_bytes(pid: int) -> dict[str, int]:
    """{"pss", "private"} bytes of a process and its direct children (a peer and its p2pd), from
    smaps_rollup: private is what it alone holds, pss adds its share of what several map."""
    total = {"pss": 0, "private": 0}
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key == "Pss":
                        total["pss"] += int(value.split()[0]) * 1024
                    elif key in ("Private_Clean", "Private_Dirty"):
                        total["private"] += int(value.split()[0]) * 1024
        except OSError:
            pass
    return total


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
