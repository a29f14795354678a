"""The scale harness: 30 to 50 real `swarm peer` processes, each on a host of its own (a network
namespace), every byte between hosts through a user-space relay that injects one-way delays of 20-100 ms
and bandwidth caps; several clients generate through them; peers die and join. One command:

    sudo .venv/bin/python -m benchmarks.scale.run --peers 40 --clients 4 --seed 1

prints one JSON object with the figures of issue 14 item 5 (progress goes to stderr) and removes every
namespace and process it made, on exit, SIGINT, SIGTERM, and (through a detached reaper) even after a
kill -9 of itself. `--cleanup` removes what any earlier run left; `--network-only` brings up the hosts
and the relay only, prints them, and holds them until interrupted (for tests and poking by hand).

The run, in phases (benchmarks/README.md shows a run's figures):

  1. network: hub + hosts (benchmarks.scale.netns), the relay in the hub (benchmarks.scale.relay), a
     bootstrap node and the monitor (benchmarks.scale.worker), seeded delays and rates (links.py).
  2. peers: `swarm peer` without --blocks (automatic block choice, 2-4 blocks each of a tiny model),
     a few starting at a time, each announcing its relay address; their memory is measured.
  3. quiet: no client, the monitor paused: what keeping records fresh costs each peer (bytes/s).
  4. generate: the clients generate, prompt after prompt, through the real client library; every
     generation's tokens are checked against local transformers' greedy output.
  5. join: new peers of the whole model start next to two clients (the best route for that client once
     seen); how long from their `ready` to their first step served.
  6. kill: once every client is mid-generation, kill -9 of 20% of the peers at once (those on the
     clients' routes first); then as many new peers start without --blocks, and the survivors rebalance;
     how long until every block is back to the coverage it had before.
  7. the clients finish, everything stops, the figures are computed (benchmarks.scale.analysis).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from benchmarks.scale import analysis, netns
from benchmarks.scale.links import delay_range_s, make_links, with_points
from benchmarks.scale.procs import ROOT, Proc, mem_available_bytes, memory_bytes, python, stop_all

P2P_PORT = 31000
DIRECT_PORT = 31001
GiB = 1 << 30


@dataclass(frozen=True)
class ScaleConfig:
    peers: int = 40
    clients: int = 4
    seed: int = 0
    blocks: int = 16  # blocks of the tiny model
    min_span: int = 2  # each peer takes --num-blocks uniform in [min_span, max_span]
    max_span: int = 4
    joiners: int = 2  # new peers next to clients (phase 5)
    kill_fraction: float = 0.2
    prompts: int = 8
    max_new_tokens: int = 16
    start_concurrency: int = 3  # peers starting at once (start-up is CPU-bound)
    rebalance_period_s: float = 120.0  # the peer's default
    quiet_s: float = 60.0
    generate_s: float = 90.0
    join_wait_s: float = 90.0
    heal_timeout_s: float = 300.0
    after_s: float = 30.0
    ready_timeout_s: float = 240.0
    min_free_bytes: int = 2 * GiB  # no peer starts while less memory than this is available
    tag: str = "run"

    def __post_init__(self) -> None:
        netns.check_tag(self.tag)
        if not 1 <= self.min_span <= self.max_span <= self.blocks:
            raise ValueError("need 1 <= min_span <= max_span <= blocks")
        if self.peers < 2 or self.clients < 1 or not 0 < self.kill_fraction < 1:
            raise ValueError("need peers >= 2, clients >= 1, 0 < kill_fraction < 1")


class Interrupted(Exception):
    pass


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def swarm_cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "swarm")
    return [script] if os.path.exists(script) else python("-m", "swarm.cli")


class Harness:
    """Hosts, relay and processes of one run; `close()` (always called) removes all of it."""

    def __init__(self, num_hosts: int, roles: dict[int, str], links, tag: str, workdir: str):
        self.tag, self.workdir, self.links = tag, workdir, links
        self.hosts = [netns.Host(i, roles.get(i, "peer"), tag) for i in range(num_hosts)]
        self.procs: list[Proc] = []
        self.relay: Proc | None = None
        self.reaper = None
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        self.stats_path = os.path.join(workdir, "relay-stats.json")

    def up(self, listen: list[int], ports: dict[int, str]) -> None:
        left = netns.cleanup(self.tag)
        if left["namespaces_removed"]:
            say(f"removed {left['namespaces_removed']} namespaces an earlier run with tag {self.tag} left")
        self.reaper = netns.start_reaper(self.tag)
        netns.create_hub(self.tag)
        netns.add_hosts(self.hosts)
        config = {"links": self.links.to_json(), "hosts": [h.as_dict() for h in self.hosts], "listen": listen,
                  "ports": {str(p): k for p, k in ports.items()}, "stats_path": self.stats_path}
        path = os.path.join(self.workdir, "relay.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.relay = self.start("relay", netns.hub_name(self.tag), python("-m", "benchmarks.scale.relay", path))
        self.relay.wait_line("relay ready", 60)

    def start(self, name: str, ns: str, argv: list[str], env: dict | None = None) -> Proc:
        proc = Proc(name, ns, argv, env=env, log_path=os.path.join(self.workdir, "logs", f"{name}.log"))
        self.procs.append(proc)
        return proc

    def relay_stats(self) -> dict:
        with open(self.stats_path) as f:
            return json.load(f)

    def close(self) -> dict:
        stop_all([p for p in self.procs if p is not self.relay])
        if self.relay is not None:
            stop_all([self.relay])
        done = netns.cleanup(self.tag)
        if self.reaper is not None and self.reaper.poll() is None:
            self.reaper.terminate()
            self.reaper.wait(10)
        return done


def _on_signal(signum, frame) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


# ---------------------------------------------------------------- the scenario


class Scenario:
    """The phases of the module docstring over one Harness; collects what analysis needs."""

    def __init__(self, cfg: ScaleConfig, workdir: str):
        self.cfg = cfg
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.killed_count = max(1, round(cfg.kill_fraction * (cfg.peers + cfg.joiners)))
        # host layout: 0 bootstrap, 1 monitor, clients, initial peers, joiners, replacements
        self.boot_host, self.monitor_host = 0, 1
        self.client_hosts = list(range(2, 2 + cfg.clients))
        first = 2 + cfg.clients
        self.peer_hosts = list(range(first, first + cfg.peers))
        self.joiner_hosts = list(range(self.peer_hosts[-1] + 1, self.peer_hosts[-1] + 1 + cfg.joiners))
        last = (self.joiner_hosts or self.peer_hosts)[-1]
        self.replacement_hosts = list(range(last + 1, last + 1 + self.killed_count))
        num_hosts = self.replacement_hosts[-1] + 1
        links = make_links(num_hosts, cfg.seed)
        # a joiner sits next to a client: that client should route through it once it sees it
        near = {h: links.points[self.client_hosts[i % cfg.clients]] for i, h in enumerate(self.joiner_hosts)}
        self.links = with_points(links, {h: (x + 0.01, y) for h, (x, y) in near.items()})
        roles = {0: "bootstrap", 1: "monitor", **{h: "client" for h in self.client_hosts}}
        self.h = Harness(num_hosts, roles, self.links, cfg.tag, workdir)
        self.peers: dict[int, Proc] = {}  # host -> peer process
        self.ready: dict[int, dict] = {}  # host -> fields of its ready line, plus "t"
        self.host_of: dict[str, int] = {}  # peer id -> host
        self.clients: list[Proc] = []
        self.monitor: Proc | None = None
        self.marks: dict[str, float] = {}
        self.out: dict = {"config": asdict(cfg)}

    # ---- processes

    def model_dir(self) -> str:
        from swarm.tiny import make_tiny_model

        return str(make_tiny_model("llama", os.path.join(self.workdir, "tiny-llama"), num_layers=self.cfg.blocks,
                                   seed=self.cfg.seed))

    def start_bootstrap(self) -> None:
        host = self.h.hosts[self.boot_host]
        proc = self.bootstrap = self.h.start("bootstrap", host.netns, [
            *swarm_cli(), "bootstrap", "--host", host.real_addr, "--port", str(P2P_PORT),
            "--announce-maddrs", f"/ip4/{host.relay_addr}/tcp/{P2P_PORT}"])
        _, line = proc.wait_line(f"/ip4/{host.relay_addr}/", 120)
        self.initial_peers = [line.strip()]

    def start_peer(self, host_index: int, name: str, num_blocks: int | None = None) -> Proc:
        host = self.h.hosts[host_index]
        span = self.rng.randint(self.cfg.min_span, self.cfg.max_span) if num_blocks is None else num_blocks
        self._wait_for_memory(name)
        # the bootstrap node and the two peers ready last, as a public swarm lists several initial peers: with
        # the bootstrap node alone, at ~35 peers on this 2-core machine new peers' p2pd could no longer
        # connect to it within its timeout (nor, in a test by hand, to any one busy node)
        running = [f"/ip4/{self.h.hosts[i].relay_addr}/tcp/{P2P_PORT}/p2p/{r['peer_id']}"
                   for i, r in self.ready.items() if self.peers[i].alive()]
        proc = self.h.start(name, host.netns, [
            *swarm_cli(), "peer", "--model", self.model,
            "--initial-peers", *self.initial_peers, *running[-2:],
            "--host", host.real_addr, "--port", str(P2P_PORT), "--direct-port", str(DIRECT_PORT),
            "--announce-maddrs", f"/ip4/{host.relay_addr}/tcp/{P2P_PORT}", "--num-threads", "1",
            "--num-blocks", str(span), "--rebalance-period-s", str(self.cfg.rebalance_period_s),
            "--drain-grace-s", "10"], env=self.env)
        self.peers[host_index] = proc
        return proc

    def _wait_for_memory(self, name: str) -> None:
        deadline = time.monotonic() + 60
        while mem_available_bytes() < self.cfg.min_free_bytes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not starting {name}: {mem_available_bytes() / GiB:.1f} GiB available, below "
                                   f"{self.cfg.min_free_bytes / GiB:.1f} GiB; run fewer peers (--peers)")
            time.sleep(1)

    def check_ready(self, host_index: int) -> bool:
        if host_index in self.ready:
            return True
        found = self.peers[host_index].first_line("ready ")
        if found is None:
            if not self.peers[host_index].alive():
                tail = "\n".join(line for _, line in self.peers[host_index].lines[-15:])
                raise RuntimeError(f"peer on host {host_index} exited before ready:\n{tail}")
            return False
        t, line = found
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.ready[host_index] = {**fields, "t": t}
        self.host_of[fields["peer_id"]] = host_index
        return True

    def start_peers(self, hosts: list[int], prefix: str, num_blocks: int | None = None) -> None:
        """Start peers, at most start_concurrency not ready at a time; returns once all are ready."""
        pending = list(hosts)
        starting: list[int] = []
        deadline = time.monotonic() + self.cfg.ready_timeout_s + 30 * len(hosts)
        while pending or starting:
            starting = [h for h in starting if not self.check_ready(h)]
            while pending and len(starting) < self.cfg.start_concurrency:
                host = pending.pop(0)
                self.start_peer(host, f"{prefix}{host}", num_blocks)
                starting.append(host)
            if time.monotonic() > deadline:
                raise TimeoutError(f"peers on hosts {starting} not ready in time")
            time.sleep(0.2)
        say(f"{len(hosts)} {prefix} peers ready")

    def alive_peers(self) -> dict[str, Proc]:
        return {self.ready[h]["peer_id"]: p for h, p in self.peers.items() if h in self.ready and p.alive()}

    def addrs(self, peer_ids) -> dict[str, list[str]]:
        by_id = {self.ready[h]["peer_id"]: self.ready[h]["addrs"].split(",") for h in self.ready}
        return {p: by_id[p] for p in peer_ids}

    def start_workers(self) -> None:
        mon = self.h.hosts[self.monitor_host]
        common = ["--model", self.model, "--initial-peers", *self.initial_peers]
        self.monitor = self.h.start("monitor", mon.netns, python(
            "-m", "benchmarks.scale.worker", "monitor", *common, "--num-blocks", str(self.cfg.blocks),
            "--period-s", "2"), env=self.env)
        self.monitor.wait_for(lambda: self.monitor.events_of("monitor_ready"), 180, "monitor_ready")

    def start_clients(self) -> None:
        common = ["--model", self.model, "--initial-peers", *self.initial_peers]
        for i, host_index in enumerate(self.client_hosts):
            host = self.h.hosts[host_index]
            self.clients.append(self.h.start(f"client{i}", host.netns, python(
                "-m", "benchmarks.scale.worker", "client", *common, "--prompts", json.dumps(self.prompts),
                "--index", str(i), "--clients", str(self.cfg.clients), "--max-new-tokens",
                str(self.cfg.max_new_tokens)), env=self.env))
        for c in self.clients:
            c.wait_for(lambda c=c: c.events_of("client_ready"), 300, "client_ready")

    # ---- monitor views

    def snapshots(self, since: float = 0.0) -> list[dict]:
        return [e for e in self.monitor.events_of("snapshot") if e["t"] >= since]

    def coverage_now(self) -> tuple[list[int], list[int]]:
        """(coverage by the records, by the records of peers still alive) of the monitor's last snapshot."""
        last = self.snapshots()[-1]
        alive = set(self.alive_peers())
        return (analysis.coverage(last["peers"], self.cfg.blocks),
                analysis.coverage(last["peers"], self.cfg.blocks, alive))

    def wait_snapshot(self, predicate, timeout_s: float, what: str) -> dict:
        since = time.time()
        return self.monitor.wait_for(
            lambda: next((e for e in reversed(self.snapshots(since)) if predicate(e)), None), timeout_s, what)

    # ---- phases

    def run(self) -> dict:
        cfg = self.cfg
        self.model = self.model_dir()
        self.env = {"SWARM_CACHE_DIR": os.path.join(self.workdir, "cache"), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": ROOT}
        self.prompts = [[self.rng.randrange(1, 500) for _ in range(self.rng.randint(6, 20))]
                        for _ in range(cfg.prompts)]
        self.reference = self.compute_reference()
        listen = [self.boot_host, *self.peer_hosts, *self.joiner_hosts, *self.replacement_hosts]
        self.h.up(listen, {P2P_PORT: "p2p", DIRECT_PORT: "direct"})
        self.out["delays_ms"] = [round(d * 1000, 1) for d in delay_range_s(self.links)]
        say(f"network up: {len(self.h.hosts)} hosts, one-way delays {self.out['delays_ms']} ms")
        self.start_bootstrap()
        self.start_workers()
        self.marks["peers_start"] = time.time()
        self.start_peers(self.peer_hosts, "peer")
        self.marks["peers_ready"] = time.time()
        everyone = set(self.alive_peers())
        try:
            seen = self.wait_snapshot(lambda e: everyone <= {p for p, v in e["peers"].items() if v[2] == "online"},
                                      180, "every peer online in the monitor's snapshot")
            self.out["all_visible_after_ready_s"] = round(seen["t"] - self.marks["peers_ready"], 1)
        except TimeoutError:  # measured, not fatal: the figures below show what that costs
            last = self.snapshots()[-1]["peers"]
            self.out["all_visible_after_ready_s"] = None
            self.out["visible_online_at_180_s"] = sum(1 for p in everyone if last.get(p, [0, 0, ""])[2] == "online")
            say(f"only {self.out['visible_online_at_180_s']} of {len(everyone)} peers online in the monitor's view")
        self.out["memory"] = self.measure_memory()
        self.start_clients()
        self.quiet()
        for c in self.clients:
            c.send("go")
        self.marks["generate"] = time.time()
        say(f"clients generating for {cfg.generate_s:.0f} s")
        time.sleep(cfg.generate_s)
        self.out["busy_traffic"] = self.traffic(cfg.generate_s / 2)
        self.join()
        self.kill_and_heal()
        time.sleep(cfg.after_s)
        self.finish_clients()
        self.out["steps_served"] = self.steps_served()
        return self.out

    def compute_reference(self) -> list[list[int]]:
        """Local transformers' greedy tokens for every prompt, in a process of its own (its memory goes)."""
        import subprocess

        done = subprocess.run(python("-m", "benchmarks.scale.worker", "reference", "--model", self.model,
                                     "--prompts", json.dumps(self.prompts), "--max-new-tokens",
                                     str(self.cfg.max_new_tokens)),
                              capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **self.env})
        for line in done.stdout.splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "reference":
                return json.loads(line)["tokens"]
        raise RuntimeError(f"reference failed: {done.stderr[-2000:]}")

    def measure_memory(self) -> dict:
        per_peer = [memory_bytes(p.pid) for p in self.alive_peers().values()]
        others = {name: memory_bytes(p.pid) for name, p in (("bootstrap", self.bootstrap), ("monitor", self.monitor))}
        return {"peer_private_mib": analysis.distribution([m["private"] / 2**20 for m in per_peer], 1),
                "peer_pss_mib": analysis.distribution([m["pss"] / 2**20 for m in per_peer], 1),
                "others_pss_mib": {k: round(v["pss"] / 2**20, 1) for k, v in others.items()},
                "available_gib_after_peers": round(mem_available_bytes() / GiB, 2)}

    def traffic(self, window_s: float) -> dict:
        """Per-host bytes/s through the relay over `window_s` from now (peers, bootstrap, clients)."""
        before, t0 = self.h.relay_stats(), time.time()
        time.sleep(window_s)
        after, t1 = self.h.relay_stats(), time.time()
        span = t1 - t0
        rates: dict[str, dict[int, float]] = {}
        for host, kinds in after["bytes"].items():
            for kind, v in kinds.items():
                old = before["bytes"].get(host, {}).get(kind, {"sent": 0, "received": 0})
                rates.setdefault(kind, {})[int(host)] = (v["sent"] + v["received"] - old["sent"] - old["received"]) / span
        alive_hosts = {self.host_of[p] for p in self.alive_peers()}
        out = {"window_s": round(span, 1), "relay_late_ms": after["late_ms"]}
        for kind, by_host in rates.items():
            out[f"{kind}_peer_bytes_s"] = analysis.distribution([by_host.get(h, 0.0) for h in alive_hosts], 0)
            out[f"{kind}_bootstrap_bytes_s"] = round(by_host.get(self.boot_host, 0.0))
            out[f"{kind}_client_bytes_s"] = analysis.distribution([by_host.get(h, 0.0) for h in self.client_hosts], 0)
        return out

    def quiet(self) -> None:
        self.monitor.send("pause")
        time.sleep(5)  # whatever the monitor had in flight
        say(f"quiet window: {self.cfg.quiet_s:.0f} s of record refresh only")
        self.out["quiet_traffic"] = self.traffic(self.cfg.quiet_s)
        self.monitor.send("resume")

    def join(self) -> None:
        if not self.joiner_hosts:
            return
        # a joiner serves the whole model next to a client: from the moment that client's planner sees it,
        # it is that client's best route, so the time to its first step is the time to be seen
        say(f"starting {len(self.joiner_hosts)} peers of all {self.cfg.blocks} blocks next to clients")
        self.start_peers(self.joiner_hosts, "joiner", self.cfg.blocks)
        ids = {self.ready[h]["peer_id"]: h for h in self.joiner_hosts}
        self.monitor.send(json.dumps({"watch": self.addrs(ids)}))
        deadline = time.monotonic() + self.cfg.join_wait_s
        first: dict[str, float] = {}
        while time.monotonic() < deadline and len(first) < len(ids):
            for e in self.monitor.events_of("watch"):
                for peer, info in e["served"].items():
                    if peer in ids and peer not in first and info and info["served"]:
                        first[peer] = e["t"]
            time.sleep(0.5)
        self.monitor.send(json.dumps({"unwatch": list(ids)}))
        self.out["join"] = [{"peer": p[-8:], "blocks": self.ready[h]["blocks"], "next_to_client": i % self.cfg.clients,
                             "traffic_after_ready_s": round(first[p] - self.ready[h]["t"], 1) if p in first else None}
                            for i, (p, h) in enumerate(ids.items())]
        say(f"joiners: {self.out['join']}")

    def mid_generation(self) -> dict[int, list] | None:
        """{client: route of its generation in flight} if every client is past the first token of one."""
        routes = {}
        for i, c in enumerate(self.clients):
            events = [e for e in c.events if e["event"] in ("gen_start", "gen_route", "generation", "gen_failed")]
            if not events or events[-1]["event"] != "gen_route":
                return None
            routes[i] = events[-1]["route"]
        return routes

    def kill_and_heal(self) -> None:
        cfg = self.cfg
        before_records, _ = self.coverage_now()
        deadline = time.monotonic() + 120
        while (routes := self.mid_generation()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the clients were never all mid-generation at once")
            time.sleep(0.05)
        alive = self.alive_peers()
        on_routes = [p for route in routes.values() for p, _, _ in route if p in alive]
        victims = list(dict.fromkeys(on_routes))[: self.killed_count]
        others = sorted(set(alive) - set(victims))
        self.rng.shuffle(others)
        victims += others[: self.killed_count - len(victims)]
        for p in victims:
            alive[p].signal(signal.SIGKILL)
        t_kill = self.marks["kill"] = time.time()
        say(f"kill -9 of {len(victims)} of {len(alive)} peers ({len(set(on_routes))} of them on routes)")
        time.sleep(0.5)
        _, after_true = self.coverage_now()
        self.out["kill"] = {"peers_before": len(alive), "killed": len(victims),
                            "killed_on_routes": len(set(victims) & set(on_routes)),
                            "coverage_before": before_records, "coverage_after": after_true,
                            "in_flight": {i: len(r) for i, r in routes.items()}}
        time.sleep(10)  # volunteers arrive a little later, while the dead peers' records still linger
        say(f"starting {len(self.replacement_hosts)} peers without --blocks")
        for host in self.replacement_hosts:
            self.start_peer(host, f"new{host}")
            time.sleep(5)
        target = min(before_records)
        healed = None
        deadline = time.monotonic() + cfg.heal_timeout_s
        while time.monotonic() < deadline:
            for h in self.replacement_hosts:
                self.check_ready(h)
            _, cov = self.coverage_now()
            if len(self.ready) == len(self.peers) and min(cov) >= target:
                healed = time.time()
                break
            time.sleep(1)
        _, cov = self.coverage_now()
        moves = {p[-8:]: [line for _, line in proc.lines if line.startswith("moving:")]
                 for p, proc in self.alive_peers().items()}
        self.out["heal"] = {
            "target_min_coverage": target, "min_coverage_after_kill": min(after_true),
            "healed_after_kill_s": round(healed - t_kill, 1) if healed else None,
            "coverage_end": cov, "new_peers": {self.ready[h]["peer_id"][-8:]: self.ready[h]["blocks"]
                                               for h in self.replacement_hosts if h in self.ready},
            "survivor_moves": {p: m for p, m in moves.items() if m},
        }
        say(f"heal: {self.out['heal']}")

    def finish_clients(self) -> None:
        for c in self.clients:
            c.send("stop")
        for c in self.clients:
            try:
                c.popen.wait(180)
            except Exception:  # a client that hangs is killed by close(); its generations count as not done
                pass

    def steps_served(self) -> dict:
        alive = self.alive_peers()
        self.monitor.send(json.dumps({"steps": self.addrs(alive)}))
        event = self.monitor.wait_for(lambda: self.monitor.events_of("steps"), 60, "steps")[0]
        served = [v["served"] for v in event["served"].values() if v]
        return {"peers_answering": len(served), "peers_with_traffic": sum(1 for s in served if s),
                "steps": analysis.distribution(served, 0)}

    # ---- the figures

    def figures(self) -> dict:
        gens, failed = [], []
        for i, c in enumerate(self.clients):
            for e in c.events:
                if e["event"] == "generation":
                    gens.append((i, e))
                elif e["event"] == "gen_failed":
                    failed.append((i, e))
        wrong = [(i, e["prompt"]) for i, e in gens if e["tokens"] != self.reference[e["prompt"]]]
        t_kill = self.marks.get("kill", float("inf"))
        spanning = [e for _, e in gens if e["t"] - e["seconds"] < t_kill < e["t"]]
        ratios = [r for i, e in gens if (r := analysis.route_ratio(
            e, self.links, self.client_hosts[i], self.host_of, self.cfg.blocks, os.path.basename(self.model)))]
        rtt = [x for i, e in gens for x in analysis.rtt_ratios(e, self.links, self.client_hosts[i], self.host_of)]
        client_fetch = [s for _, e in gens for s in e["fetch_s"]]
        reads = self.snapshots()  # the monitor's
        monitor_fetch = [e["fetch_s"] for e in reads]
        return {
            "generations": {"completed": len(gens), "failed": len(failed), "wrong_tokens": len(wrong),
                            "in_flight_at_kill": len(spanning),
                            "in_flight_at_kill_exact": sum(e["tokens"] == self.reference[e["prompt"]] for e in spanning),
                            "recovered": sum(1 for _, e in gens if e["recoveries"]),
                            "failures": [e["error"][:200] for _, e in failed][:5],
                            "seconds": analysis.distribution([e["seconds"] for _, e in gens], 2)},
            "route_ratio": {**analysis.distribution([r["ratio"] for r in ratios]),
                            "within_10pct": round(sum(r["ratio"] <= 1.1 for r in ratios) / max(1, len(ratios)), 3)},
            "push_path_ratio": analysis.distribution([r["push_ratio"] for r in ratios]),
            "hops": analysis.distribution([r["hops"] for r in ratios], 1),
            "modelled_push_step_s": analysis.distribution([r["push_chosen_s"] for r in ratios]),
            "measured_step_s": analysis.distribution([r["step_s"] for r in ratios]),
            "measured_over_true_rtt": analysis.distribution(rtt, 2),
            "snapshot_fetch_s": {"client": analysis.distribution(client_fetch, 3),
                                 "monitor": analysis.distribution(monitor_fetch, 3)},
            "find_rpcs_per_fetch": analysis.distribution([e["find_rpcs"] for e in reads], 1),
            "find_nodes_per_fetch": analysis.distribution([e["find_nodes"] for e in reads], 1),
            # how long the monitor's answered find RPCs took: each read's median and slowest
            "find_rpc_ms": {"median": analysis.distribution([m for e in reads if (m := e.get("find_ms_median"))], 1),
                            "max": analysis.distribution([m for e in reads if (m := e.get("find_ms_max"))], 1)},
            # the monitor's DHT routing table and its suspended nodes at each of its reads
            "monitor_table_nodes": analysis.distribution([e.get("table", 0) for e in reads], 1),
            "monitor_suspended_nodes": analysis.distribution([e.get("suspended", 0) for e in reads], 1),
            # (seconds since the first read, peers in the view) at every 10th read of the monitor
            "monitor_view_peers": [[round(e["t"] - reads[0]["t"]), len(e["peers"])] for e in reads[::10]],
            "peers_ready_s": analysis.distribution(
                [self.ready[h]["t"] - self.peers[h].started_at for h in self.ready], 1),
            "placement": self.placement_figures(),
        }

    def placement_figures(self) -> dict:
        """How fast the first peers (all without --blocks) covered the model, and how often peers moved:
        in the first 10 minutes, before the kill (settling: flapping shows here) and after it (healing)."""
        t0 = self.marks["peers_start"]
        covered = next((e["t"] for e in self.snapshots(t0)
                        if min(analysis.coverage(e["peers"], self.cfg.blocks)) >= 1), None)
        moves = sorted((t, p.name) for p in self.peers.values() for t, _ in p.lines_starting("moving:"))
        t_kill = self.marks.get("kill", math.inf)
        first = [(t, name) for t, name in moves if t - t0 <= 600]
        return {
            "initial_peers": self.cfg.peers, "start_concurrency": self.cfg.start_concurrency,
            "first_full_coverage_s": round(covered - t0, 1) if covered else None,
            "all_initial_ready_s": round(self.marks["peers_ready"] - t0, 1),
            "observed_s": round(time.time() - t0, 1),
            "moves_total": len(moves),
            "moves_first_10_min": len(first),
            "peers_moved_first_10_min": len({name for _, name in first}),
            "moves_before_kill": sum(t < t_kill for t, _ in moves),
            "moves_after_kill": sum(t >= t_kill for t, _ in moves),
        }


def network_only(num_hosts: int, ports: list[int], seed: int, tag: str, workdir: str) -> None:
    """Hosts and relay only: print them as one JSON line, hold until a signal."""
    links = make_links(num_hosts, seed)
    harness = Harness(num_hosts, {}, links, tag, workdir)
    try:
        harness.up(list(range(num_hosts)), {p: f"port{p}" for p in ports})
        print(json.dumps({"event": "network_ready", "hosts": [h.as_dict() for h in harness.hosts],
                          "links": json.loads(links.to_json()), "stats_path": harness.stats_path,
                          "relay_pid": harness.relay.pid}), flush=True)
        while True:
            time.sleep(3600)
    finally:
        harness.close()


def main(argv: list[str] | None = None) -> int:
    d = ScaleConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale.run", description=__doc__.split("\n\n")[0])
    for name, value in asdict(d).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--cleanup", action="store_true", help="remove what earlier runs left (every tag), and exit")
    p.add_argument("--network-only", type=int, metavar="HOSTS", help="bring up HOSTS hosts and the relay, hold")
    p.add_argument("--ports", type=int, nargs="+", default=[5000], help="with --network-only: relayed ports")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, relay stats)")
    args = p.parse_args(argv)
    if args.cleanup:
        print(json.dumps(netns.cleanup()))
        return 0
    if os.geteuid() != 0:
        print("the scale harness needs root (ip netns)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    workdir = tempfile.mkdtemp(prefix=f"swarm-scale-{args.tag}-")
    if args.network_only:
        try:
            network_only(args.network_only, args.ports, args.seed, netns.check_tag(args.tag), workdir)
        except Interrupted:
            pass
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    cfg = ScaleConfig(**{k: getattr(args, k) for k in asdict(d)})
    scenario = Scenario(cfg, workdir)
    result, code = {}, 0
    try:
        result = scenario.run()
    except (Interrupted, Exception) as e:  # reported with what was measured so far; cleanup follows
        say(f"run stopped: {type(e).__name__}: {e}")
        result = {**scenario.out, "error": f"{type(e).__name__}: {e}"}
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if scenario.clients:
                result["figures"] = scenario.figures()
        finally:
            result["cleanup"] = scenario.h.close()
            if args.keep:
                result["workdir"] = workdir
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
