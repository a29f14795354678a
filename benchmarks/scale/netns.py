"""Hosts as network namespaces on one bridge, and their removal, for the scale harness.

Layout of one run (every name starts with `swscale-<tag>-`, so `cleanup(tag)` finds what a crashed run
left, and two runs with different tags never touch each other's namespaces):

    namespace swscale-<tag>-hub   bridge `swsbr` 11.18.0.1/15, plus one relay address per host (/32)
    namespace swscale-<tag>-hN    veth `swsNa` with the host's real address; its twin `swsNb` is a port
                                  of the bridge (in the hub)

Both veth ends are created directly inside namespaces: nothing of ours ever sits in the root namespace,
and the hub has IP forwarding off (a fresh namespace's default). Every bridge port is *isolated*
(`bridge link set ... isolated on`): hosts cannot reach one another at layer 2, only the hub's own
addresses. So the only path between two hosts is the relay process in the hub (benchmarks.scale.relay),
which applies the injected delays: nothing bypasses it, whatever addresses libp2p learns.

Addresses come from 11.18.0.0/15: host i's real address is 11.18.0.0 + 10 + i, its relay address
11.19.0.0 + 10 + i (both inside the /15, so on-link). They stand for the public addresses of hosts on the
internet, which is what libp2p must see to behave as it would there; they are never routed outside the
harness's namespaces (the hub has no uplink and forwards nothing). Two ranges that looked more natural
were tried and each changed libp2p's behaviour: 198.18.0.0/15 (RFC 2544's benchmark range) counts as
unroutable, so p2pd's own DHT dropped every address and could find no peer by id; 10.18.0.0/15 counts as
private, and there a client's p2pd gave up on the busy bootstrap node after ~6 s a try (go-libp2p
likely uses a shorter dial timeout for private addresses), so clients failed to start.

Interruption: `start_reaper(tag)` starts a detached process that waits for the harness to exit (a pidfd,
so a reused pid cannot fool it) and then runs `cleanup(tag)`: even a kill -9 of the harness leaves
nothing behind. `python -m benchmarks.scale.netns cleanup [--tag T]` does the same by hand.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

PREFIX = "swscale"
BRIDGE = "swsbr"
HUB_ADDR = "11.18.0.1"
_BASE = 10
_REAL_NET = ipaddress.IPv4Address("11.18.0.0")
_RELAY_NET = ipaddress.IPv4Address("11.19.0.0")
MAX_HOSTS = 60000
IP_TIMEOUT_S = 30


def hub_name(tag: str) -> str:
    return f"{PREFIX}-{tag}-hub"


@dataclass(frozen=True)
class Host:
    """One simulated machine: its namespace, the address it listens on, the address others dial."""

    index: int
    role: str  # "bootstrap", "peer", "client", "monitor", or anything a test names
    tag: str

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.tag}-h{self.index}"

    @property
    def real_addr(self) -> str:
        return str(_REAL_NET + _BASE + self.index)

    @property
    def relay_addr(self) -> str:
        return str(_RELAY_NET + _BASE + self.index)

    def as_dict(self) -> dict:
        return {"index": self.index, "role": self.role, "netns": self.netns, "real": self.real_addr,
                "relay": self.relay_addr}


def check_tag(tag: str) -> str:
    if not tag or len(tag) > 24 or not all(c.isalnum() for c in tag):
        raise ValueError(f"tag {tag!r}: 1 to 24 letters or digits")
    return tag


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _batch(commands: list[str], netns: str | None = None) -> None:
    """Run many `ip` commands in one process (`ip -batch`), failing on the first error."""
    if not commands:
        return
    args = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    done = subprocess.run(args, input="\n".join(commands) + "\n", capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S * 2)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")


def create_hub(tag: str) -> None:
    hub = hub_name(tag)
    _ip("netns", "add", hub)
    _batch(["link set lo up", f"link add {BRIDGE} type bridge", f"addr add {HUB_ADDR}/15 dev {BRIDGE}",
            f"link set {BRIDGE} up"], hub)


def add_hosts(hosts: list[Host]) -> None:
    """Namespaces, veth pairs, addresses, isolated bridge ports, relay addresses on the hub."""
    if not hosts:
        return
    hub = hub_name(hosts[0].tag)
    for host in hosts:
        if not 0 <= host.index < MAX_HOSTS:
            raise ValueError(f"host index {host.index} out of range")
        _ip("netns", "add", host.netns)
    # one `ip -batch` in the root namespace creates every pair straight inside the two namespaces
    _batch([f"link add sws{h.index}a netns {h.netns} type veth peer name sws{h.index}b netns {hub}" for h in hosts])
    for host in hosts:
        _batch(["link set lo up", f"addr add {host.real_addr}/15 dev sws{host.index}a",
                f"link set sws{host.index}a up"], host.netns)
    hub_commands = []
    for host in hosts:
        outer = f"sws{host.index}b"
        hub_commands += [f"link set {outer} master {BRIDGE}", f"link set {outer} up",
                         f"addr add {host.relay_addr}/32 dev {BRIDGE}"]
    _batch(hub_commands, hub)
    bridge_commands = "".join(f"link set dev sws{h.index}b isolated on\n" for h in hosts)
    done = subprocess.run(["bridge", "-n", hub, "-batch", "-"], input=bridge_commands, capture_output=True,
                          text=True, timeout=IP_TIMEOUT_S * 2)
    if done.returncode != 0:
        raise RuntimeError(f"bridge -batch failed: {done.stderr.strip()}")


def ours(tag: str | None = None) -> list[str]:
    """Namespaces of this harness: of run `tag`, or of every run when tag is None."""
    start = f"{PREFIX}-{tag}-" if tag else f"{PREFIX}-"
    out = _ip("netns", "list", check=False).stdout
    return [words[0] for words in (line.split() for line in out.splitlines()) if words and words[0].startswith(start)]


def netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def cleanup(tag: str | None = None, grace_s: float = 5.0) -> dict:
    """Remove the namespaces of run `tag` (every run's when None) and kill -9 the processes still inside
    them (all started by this harness: nothing else runs in a namespace with our prefix). Safe any time.
    The relay (in the hub) and every host process die before their namespaces go."""
    names = ours(tag)
    pids = sorted({pid for name in names for pid in netns_pids(name) if pid != os.getpid()})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for name in names:  # deleting a namespace deletes its veth ends, and with them their twins
        _ip("netns", "del", name, check=False)
    left = ours(tag)
    return {"namespaces_removed": len(names) - len(left), "processes_killed": len(pids), "left": left}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_reaper(tag: str, pid: int | None = None) -> subprocess.Popen:
    """A detached process (own session: a terminal's Ctrl-C does not reach it) that runs cleanup(tag) once
    process `pid` (default: this one) has exited, however it exited."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale.netns", "reap", "--tag", tag, "--pid", str(pid or os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )


def _reap(tag: str, pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the harness cleaned up itself and says so
        select.select([fd], [], [])  # readable once the process has exited
    cleanup(tag)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale.netns")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cleanup", help="remove what a run left (every run's without --tag)")
    c.add_argument("--tag")
    r = sub.add_parser("reap", help="wait for --pid to exit, then clean up run --tag")
    r.add_argument("--tag", required=True)
    r.add_argument("--pid", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "cleanup":
        print(json.dumps(cleanup(args.tag)))
    else:
        _reap(check_tag(args.tag), args.pid)


if __name__ == "__main__":
    main()
