"""Serving under load: many concurrent sessions through a swarm, time to first token, KV memory per token.

Peers are real `swarm peer` processes (client.launcher.LocalSwarm) on loopback, an even split of the
blocks over --peers. Prints one JSON object on stdout; progress goes to stderr. README.md beside this
file explains every figure. Baselines (local transformers, and C = 1) are measured in the same run.

  1. single stream: greedy decode tokens/s of `generate` through the swarm against local transformers
     eager `generate` (same checkpoint, device, dtype, prompt; EOS disabled); bench_decode's method;
  2. C concurrent sessions spread evenly over min(C, --client-procs) client worker processes (spawned
     and warmed up once; each its own client model, p2pd, event loop and GIL, as C users would be C
     machines; --client-procs 1 puts all sessions in one process), one thread per session driving
     `InferenceSession.step` (several client models in a worker when the peers' per-client session
     limit is below its share; a worker's sessions share one batched LM head, see `Heads`), after an
     unmeasured warm-up run at the largest C: every session prefills its own random prompt, all
     sessions of all workers wait at one cross-process barrier, then all decode N - 1 steps at once.
     Aggregate tokens/s = C x (N - 1) / (barrier to the last session's last token; `time.monotonic` is
     one clock for all processes); step latencies over all sessions' steps; each peer's batching and
     timing figures around the run (`batching`); greedy tokens of session 0
     (prompt 0) against the same prompt decoded alone (the C = 1 run, one process), and of every
     session against local transformers (all prompts in one local `generate`);
  3. time to first token of a long prompt: `generate(max_new_tokens=1)`, call to return, after a warm-up
     (through the swarm: route planning and stream opening included; measured after step 2);
  4. with the largest C's sessions still open (the workers close them only when told): each peer's
     `info` (kv_cache, device_memory, when the peer reports them) against 2 x blocks x kv_heads x
     head_dim x dtype bytes per cached token.

    python benchmarks/bench_serving.py                                     # CPU, tiny Llama, C = 1,8,32,64
    python benchmarks/bench_serving.py --device cuda --dtype bfloat16 --llama8b
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import bench_decode  # benchmarks/bench_decode.py, beside this file
import torch
from bench_decode import (
    add_model_args,
    even_spans,
    figures,
    finish_model_args,
    machine_info,
    model_info,
    prepare_model,
    quantile,
    timed_runs,
)

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.launcher import SWARM, LocalSwarm
from client.session import InferenceSession


def log(message: str) -> None:
    print(f"[bench_serving {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


bench_decode.log = log  # its helpers (model building, timed_runs) report under this script's name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=2, help="number of peers (an even split of the blocks)")
    p.add_argument("--concurrency", default="1,8,32,64", help="session counts C (1 always runs)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt of each session")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per session (N)")
    p.add_argument("--ttft-prompt-tokens", type=int, help="TTFT prompt (default: 512 CPU, 2048 GPU)")
    p.add_argument("--repeats", type=int, default=3, help="runs of single stream, TTFT and C = 1 (medians)")
    p.add_argument("--client-procs", type=int, default=4,
                   help="client worker processes the C sessions are spread over (min(C, this) take part)")
    add_model_args(p, threads_help="torch CPU threads here, in each client and peer")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    p.add_argument("--peer-flags", default="", help="more `swarm peer` flags, e.g. --peer-flags=--no-cuda-graphs")
    args = p.parse_args(argv)
    finish_model_args(args)
    args.concurrency = sorted({1, *(int(c) for c in args.concurrency.split(","))})
    args.ttft_prompt_tokens = args.ttft_prompt_tokens or (512 if args.device == "cpu" else 2048)
    if args.client_procs < 1:
        p.error("--client-procs must be >= 1")
    if args.new_tokens < 3:
        p.error("--new-tokens must be >= 3 (a decode rate needs two decode steps)")
    return args


# ---------------------------------------------------------------- swarm and clients


def peer_supports(flag: str) -> bool:
    return flag in subprocess.run([*SWARM, "peer", "--help"], capture_output=True, text=True).stdout


def ready_fields(line: str) -> tuple[str, list[str]]:
    """(peer id, multiaddrs) from a peer's `ready peer_id=... model=... blocks=... addrs=a,b` line."""
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    return fields["peer_id"], [a for a in fields.get("addrs", "").split(",") if a]


def new_client(path: Path, initial_peers: list[str], args, **fields) -> DistributedModelForCausalLM:
    """A client of the swarm on the device and dtype of `args` (`fields`: more ClientConfig fields)."""
    config = ClientConfig(initial_peers=tuple(initial_peers), wait_for_route_s=60, **fields)
    client = DistributedModelForCausalLM.from_pretrained(
        path, client_config=config, dtype=getattr(torch, args.dtype), device=args.device)
    loop.run(client.transport(), timeout_s=120)  # p2pd + DHT now: concurrent sessions must not race to it
    return client


def peer_infos(client, peers: list[tuple[str, list[str]]]) -> list[dict]:
    from swarm.probe import request_info

    transport = loop.run(client.transport(), timeout_s=60)
    return [loop.run(request_info(transport.p2p, pid, addrs, 10.0), timeout_s=20) for pid, addrs in peers]


def wait_idle(client, peers, timeout_s: float = 30.0) -> None:
    """Until no peer holds a session: a closed stream is released by the peer a moment later, and a
    refused open (per-client limit) would get the peer banned by the next run's sessions."""
    deadline = time.monotonic() + timeout_s
    while any(info.get("active_sessions") for info in peer_infos(client, peers)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"peers still hold sessions {timeout_s} s after the client closed them")
        time.sleep(0.2)


# ---------------------------------------------------------------- measurements


def ttft_runs(model, prompt: torch.Tensor, repeats: int, what: str) -> list[float]:
    """Seconds from a `generate(max_new_tokens=1)` call to its return: one warm-up, then `repeats` runs."""
    times = []
    for _ in range(repeats + 1):
        start = time.monotonic()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)
        times.append(time.monotonic() - start)
    log(f"{what}: first token of a {prompt.shape[1]}-token prompt after {statistics.median(times[1:]):.3f} s")
    return times[1:]


class Heads:
    """A worker's next-token work for all of its sessions, batched: whatever sessions' hidden states are
    waiting go through norm + LM head + greedy pick + the embedding of the picked tokens together, one
    device pass and one host sync per batch (as `forward` + `generate` do for one session).

    The load generator's stand-in for C users' own machines: here C sessions' clients share the peers'
    one GPU, and C separate 1 GB LM-head reads per round (each a CUDA context switch and a sync) would
    measure the clients' GPU contention, not the swarm's serving. Every C, C = 1 included, runs this way.

    No thread of its own: the first session to arrive while no batch runs leads one, for itself and
    everyone waiting by then, and hands the lead to the first session that came meanwhile (so a lone
    session computes its own head, with no thread hand-off).
    """

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._waiting: list[tuple[torch.Tensor, _Slot]] = []
        self._busy = False  # a batch is being computed

    def next(self, hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(greedy next token, its embedding [1, 1, hidden] on the CPU) after a step's output [1, new, hidden]."""
        slot = _Slot()
        with self._lock:
            self._waiting.append((hidden[:, -1], slot))
            if not self._busy:
                self._busy = slot.lead = True
        if not slot.lead:
            slot.done.wait()  # set with a result, or with the lead
        if slot.lead:
            with self._lock:
                items, self._waiting = self._waiting, []
            self._compute(items)
            with self._lock:
                if self._waiting:
                    self._waiting[0][1].lead = True
                    self._waiting[0][1].done.set()
                else:
                    self._busy = False
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _compute(self, items: list[tuple[torch.Tensor, _Slot]]) -> None:
        client = self.client
        try:
            with torch.inference_mode():
                hidden = torch.cat([h for h, _ in items]).to(client.device)  # [n, hidden]
                ids = client.lm_head(client.norm(hidden)).float().argmax(-1)
                embeds = client.embed_tokens(ids[:, None]).cpu()
            results = list(zip(ids.tolist(), embeds.split(1), strict=True))
        except Exception as e:  # each session of the batch reports it
            results = [e] * len(items)
        for (_, slot), result in zip(items, results, strict=True):
            slot.result, slot.lead = result, False
            slot.done.set()


@dataclass(eq=False)
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: object = None


def drive(heads: Heads, session, prompt, steps: int, barrier: threading.Barrier, out: dict) -> None:
    """A session's thread: prefill, wait for every session at the barrier, then `steps` decode steps."""
    try:
        with torch.inference_mode():  # thread-local: set in every thread
            valid = torch.ones((1, 1), dtype=torch.bool)
            hidden = session.step(heads.client.embed_tokens(prompt), torch.ones(prompt.shape, dtype=torch.bool))
            token, embeds = heads.next(hidden)
            tokens = [token]
            out["prefilled"] = time.monotonic()
            barrier.wait(timeout=600)
            stamps = [time.monotonic()]
            for _ in range(steps):
                token, embeds = heads.next(session.step(embeds, valid))
                tokens.append(token)
                stamps.append(time.monotonic())
        out.update(tokens=tokens, stamps=stamps)
    except BaseException as e:  # reported by the main thread
        out["error"] = e
        barrier.abort()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (Linux /proc; missing ones left out)."""
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return out


# ---------------------------------------------------------------- client worker processes


def spread(c: int, procs: int) -> list[list[int]]:
    """Session indices (= prompt rows) of each worker, round robin: even shares, session 0 on worker 0."""
    return [list(range(w, c, procs)) for w in range(procs)]


def client_worker(conn, start, model_path: Path, initial_peers: list[str], n_clients: int, per_client: int,
                  prompts: list[list[int]], args) -> None:
    """A client process (spawned): builds its client models (transports started) and warms them up,
    says "ready", then serves one run per list of session indices it receives, until None."""
    torch.set_num_threads(args.threads)
    prompts = torch.tensor(prompts, device=args.device)
    clients = []
    heads = None
    try:
        for _ in range(n_clients):
            clients.append(new_client(model_path, initial_peers, args))
            heads = heads or Heads(clients[0])  # every client model here holds the same weights
            warm_up(clients[-1], heads, prompts[:1], args)
        conn.send("ready")
        while (indices := conn.recv()) is not None:
            owners = [clients[j // per_client] for j in range(len(indices))]  # at most per_client each
            serve_run(owners, heads, [prompts[i : i + 1] for i in indices], start, conn, args)
    except BaseException:
        start.abort()  # nobody waits for a worker that is gone
        raise
    finally:
        for client in clients:
            client.shutdown()


def warm_up(client, heads: Heads, prompt: torch.Tensor, args) -> None:
    """One session of a run's length, alone: a fresh process's first steps are slow (first calls)."""
    out = {}
    with InferenceSession(client, args.prompt_tokens + args.new_tokens) as session:
        drive(heads, session, prompt, args.new_tokens - 1, threading.Barrier(1), out)  # nothing to wait for
    if "error" in out:
        raise out["error"]


def serve_run(owners: list, heads: Heads, prompts: list[torch.Tensor], start, conn, args) -> None:
    """A worker's share of one run, a thread per session: prefill, meet every worker's sessions at the
    cross-process barrier `start`, decode. The reply goes back with the sessions still open; they close
    when the parent says so (after it has read the peers' info)."""
    sessions = [InferenceSession(owner, args.prompt_tokens + args.new_tokens) for owner in owners]
    arrived: list[float] = []

    def meet() -> None:  # once all sessions here have prefilled: wait for the other workers' sessions
        arrived.append(time.monotonic())
        start.wait(timeout=600)

    outs = [{} for _ in owners]
    errors: list[BaseException] = []
    if owners:
        barrier = threading.Barrier(len(owners), action=meet)
        threads = [threading.Thread(target=drive, daemon=True, args=(
            heads, session, prompt, args.new_tokens - 1, barrier, out))
            for session, prompt, out in zip(sessions, prompts, outs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [o.pop("error") for o in outs if "error" in o]
    else:  # no session here in this run (C < workers), still a party of the barrier
        try:
            meet()
        except threading.BrokenBarrierError as e:
            errors = [e]
    if errors:
        start.abort()  # the other workers and the parent stop waiting
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))  # the cause first
    conn.send({"outs": outs, "arrived": arrived, "errors": [repr(e) for e in errors]})
    conn.recv()  # "close"
    for s in sessions:
        s.close()
    conn.send("closed")


class ClientPool:
    """`size` client worker processes ("spawn" context), each with its own client models, p2pd, event
    loop and GIL; `start` is a run's cross-process barrier: one party per worker, and this process."""

    def __init__(self, size: int, model_path: Path, initial_peers: list[str], n_clients: int, per_client: int,
                 prompts: torch.Tensor, args):
        ctx = multiprocessing.get_context("spawn")
        self.start = ctx.Barrier(size + 1)
        self.workers: list[tuple] = []  # (pipe end, process)
        try:
            for w in range(size):
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=client_worker, name=f"client{w}", daemon=True, args=(
                    child, self.start, model_path, initial_peers, n_clients, per_client, prompts.tolist(),
                    args))
                proc.start()
                child.close()
                self.workers.append((conn, proc))
            self.receive_all(timeout_s=args.startup_timeout_s)  # every "ready"
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> dict[str, int]:
        return {proc.name: proc.pid for _, proc in self.workers}

    def send_all(self, messages: list) -> None:
        for (conn, _), message in zip(self.workers, messages, strict=True):
            conn.send(message)

    def receive_all(self, timeout_s: float = 660.0) -> list:
        return [self._receive(conn, proc, timeout_s) for conn, proc in self.workers]

    @staticmethod
    def _receive(conn, proc, timeout_s: float):
        try:
            if conn.poll(timeout_s):
                return conn.recv()
        except EOFError:
            pass
        raise RuntimeError(f"{proc.name}: no reply within {timeout_s} s (exit code {proc.exitcode})")

    def close(self) -> None:
        """Each worker shuts its clients down (their p2pd) and exits; one that does not is terminated."""
        for conn, proc in self.workers:
            if proc.is_alive():
                conn.send(None)
        for _, proc in self.workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def concurrent_run(c: int, pool: ClientPool, per_client: int, args, pids, while_open=None) -> dict:
    """C sessions at once, spread over the pool's workers; `while_open()` runs after the decode, every
    session still open."""
    groups = spread(c, len(pool.workers))
    opened = time.monotonic()
    pool.send_all(groups)
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its reply says why
            pool.start.wait(timeout=660)
        cpu0 = cpu_seconds(pids)
        replies = pool.receive_all()
        t1, cpu1 = time.monotonic(), cpu_seconds(pids)
        errors = [e for r in replies for e in r["errors"]]
        if errors:
            first = next((e for e in errors if not e.startswith("BrokenBarrierError")), errors[0])
            raise RuntimeError(f"C={c}: {len(errors)} sessions failed; first: {first}")
        extra = while_open() if while_open else None
    finally:
        pool.send_all(["close"] * len(groups))
        pool.receive_all()
    outs = [None] * c
    for group, reply in zip(groups, replies, strict=True):
        for i, o in zip(group, reply["outs"], strict=True):
            outs[i] = o
    t0 = max(t for r in replies for t in r["arrived"])  # the last arrival released the barrier
    wall = max(o["stamps"][-1] for o in outs) - t0
    steps_ms = [1e3 * (b - a) for o in outs for a, b in pairwise(o["stamps"])]
    per_session = [(args.new_tokens - 1) / (o["stamps"][-1] - t0) for o in outs]
    busy = {k: round((cpu1[k] - cpu0[k]) / (t1 - t0), 2) for k in cpu1 if k in cpu0}
    result = {
        "sessions": c, "client_procs": sum(1 for g in groups if g),
        "clients": sum(math.ceil(len(g) / per_client) for g in groups),
        "open_and_prefill_s": round(max(o["prefilled"] for o in outs) - opened, 3),
        "decode_wall_s": round(wall, 4), "aggregate_tokens_s": round(c * (args.new_tokens - 1) / wall, 2),
        "step_ms_p50": round(statistics.median(steps_ms), 3),
        "step_ms_p99": round(quantile(steps_ms, 0.99), 3), "step_ms_max": round(max(steps_ms), 3),
        "session_tokens_s_min": round(min(per_session), 2),
        "session_tokens_s_max": round(max(per_session), 2),
        # CPU cores each process kept busy during the decode (a client process: all its threads)
        "cpu_cores_busy": busy,
        "client_procs_cores_busy": round(sum(busy.get(name, 0.0) for name in pool.pids), 2),
        "tokens": [o["tokens"] for o in outs],  # checked against C = 1 and local ones, then dropped
    }
    log(f"C={c} on {result['client_procs']} client process(es): {result['aggregate_tokens_s']:.1f} "
        f"tokens/s aggregate over {wall:.2f} s; step ms p50 {result['step_ms_p50']:.1f}, "
        f"p99 {result['step_ms_p99']:.1f}, max {result['step_ms_max']:.1f}")
    return result if extra is None else {**result, "kv_memory": extra}


def _number(mapping, key: str) -> float | None:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _per_token(nbytes: float | None, tokens: float | None, unit: float = 1.0) -> float | None:
    return round(nbytes / tokens / unit, 4) if nbytes is not None and tokens else None


def kv_memory(infos: list[dict], config, expected_tokens: int, cuda: bool) -> list[dict]:
    """Per peer: bytes per cached token, by the peer's own account and (CUDA) its allocator, vs theory."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = []
    for info in infos:
        start, end = info["span"]
        dtype_bytes = getattr(torch, info["dtype"]).itemsize
        theory = 2 * (end - start) * config.num_key_value_heads * head_dim * dtype_bytes
        kv, mem = info.get("kv_cache"), info.get("device_memory")
        tokens, used = _number(kv, "tokens"), _number(kv, "used_bytes")
        base = _number(mem, "baseline_bytes") if cuda else None  # weights and buffers, before any session
        peak, held = (None if base is None or _number(mem, k) is None else _number(mem, k) - base
                      for k in ("peak_bytes", "allocated_bytes"))
        out.append({
            "span": f"{start}:{end}", "dtype": info["dtype"], "active_sessions": info.get("active_sessions"),
            "expected_tokens": expected_tokens, "kv_cache": kv, "device_memory": mem,
            "theory_bytes_per_token": theory,
            "peer_theory_bytes_per_token": _number(kv, "bytes_per_token_theory"),
            "used_bytes_per_token": _per_token(used, tokens),
            "used_over_theory": _per_token(used, tokens, theory),
            "device_bytes_per_token": _per_token(peak, tokens),
            "device_over_theory": _per_token(peak, tokens, theory),
            "device_allocated_over_theory": _per_token(held, tokens, theory),
            "scheduler": info.get("scheduler"),  # the peer's batching figures, when it reports them
        })
    return out


def batching(before: list[dict], after: list[dict]) -> list[dict]:
    """Per peer, from its scheduler counters around one run: forwards run, segments (steps, or chunks of
    a prompt) per forward (a crowd served in cohorts shows many), a forward's mean wall time, how long a
    step stayed queued before its forward began (gathering included), and how long the peer took from
    taking a step to writing its result (queue, forward, push to the next peer, reply), the last part
    of which ("answer": from its output back on the event loop to the reply written); steps pushed on
    to the next peer per message (a forward's cohort travels batched); CUDA graphs recorded meanwhile (a
    forward that records one takes that long too)."""
    out = []
    for b, a in zip(before, after, strict=True):
        forwards, segments, steps, wait_s, busy_s = _grew(b, a, "scheduler", "iterations", "segments", "steps",
                                                          "wait_s", "busy_s")
        served, serve_s, answer_s = _grew(b, a, "steps", "served", "serve_s", "answer_s")
        pushed, messages = _grew(b, a, "forward", "pushed", "push_messages")
        recorded, record_ms = _grew(b, a, "cuda_graphs", "recorded", "record_ms")
        out.append({"span": "{}:{}".format(*a["span"]), "forwards": forwards,
                    "segments_per_forward": round(segments / forwards, 2) if forwards else None,
                    "forward_ms": round(1000 * busy_s / forwards, 3) if forwards else None,
                    "queued_ms_per_step": round(1000 * wait_s / steps, 3) if steps else None,
                    "served_ms_per_step": round(1000 * serve_s / served, 3) if served else None,
                    "answer_ms_per_step": round(1000 * answer_s / served, 3) if served else None,
                    "steps_per_push": round(pushed / messages, 2) if messages else None,
                    "graphs_recorded": recorded, "graph_record_ms": round(record_ms, 1)})
    return out


def _grew(before: dict, after: dict, section: str, *keys: str) -> list:
    """How much counters `keys` of one `info` section grew (a section a peer lacks counts as zeros)."""
    old, new = before.get(section) or {}, after.get(section) or {}
    return [new.get(k, 0) - old.get(k, 0) for k in keys]


# ---------------------------------------------------------------- main


def concurrency_runs(pool: ClientPool, per_client: int, client, peers, config, pids, args) -> dict:
    """Every C through the pool: C = 1 is every ratio's denominator and the shortest run, so the noisiest:
    --repeats runs, the median kept. The KV report is taken while the largest C's sessions are open."""
    top = max(args.concurrency)
    expected_tokens = top * (args.prompt_tokens + args.new_tokens - 1)
    cuda = args.device.startswith("cuda")

    def report() -> list[dict]:
        return kv_memory(peer_infos(client, peers), config, expected_tokens, cuda)

    # A peer's KV pool grows to its peak use once in its life, and every growth re-records its decode
    # graphs (tens of ms each, stalling every session): one unmeasured run at the largest C first, so
    # that each measured C sees the steady state
    wait_idle(client, peers)
    concurrent_run(top, pool, per_client, args, pids)
    out = {}
    for c in args.concurrency:
        runs = []
        for _ in range(args.repeats if c == 1 else 1):
            wait_idle(client, peers)
            before = peer_infos(client, peers)
            runs.append(concurrent_run(c, pool, per_client, args, pids, report if c == top else None))
            runs[-1]["batching"] = batching(before, peer_infos(client, peers))
        out[c] = chosen = sorted(runs, key=lambda r: r["aggregate_tokens_s"])[len(runs) // 2]
        if len(runs) > 1:
            chosen["aggregate_tokens_s_runs"] = [r["aggregate_tokens_s"] for r in runs]
    return out


def measure_swarm(swarm: LocalSwarm, model_path: Path, config, prompts, ttft_prompt, args) -> dict:
    """Start the peers; single stream and TTFT through this process's client, every C through a pool of
    min(max C, --client-procs) client processes (each with several client models if the peers'
    per-client session limit is below its share)."""
    flags = ["--device", args.device, "--dtype", args.dtype, *args.peer_flags.split()]
    limit_flag = peer_supports("--max-sessions-per-client")
    if limit_flag:  # twice the need: a session the peer has not released yet still counts
        flags += ["--max-sessions-per-client", str(2 * max(args.concurrency))]
    spans = even_spans(config.num_hidden_layers, args.peers)
    log(f"starting peers {spans}")
    start = time.monotonic()
    procs = swarm.start_peers(spans, extra=flags)
    peers = [ready_fields(p.ready_line) for p in procs]
    pids = {"bench": os.getpid(), **{p.name: p.popen.pid for p in procs}}
    log(f"peers ready in {time.monotonic() - start:.1f} s")
    client = new_client(model_path, swarm.initial_peers, args)
    out = {"spans": spans, "max_sessions_per_client_flag": limit_flag}
    try:
        out["single"] = timed_runs(client, prompts[:1], args, "swarm")
        limits = [i.get("limits", {}).get("max_sessions_per_client", 32) for i in peer_infos(client, peers)]
        out["sessions_per_client"] = per_client = min(limits)
        size = min(args.client_procs, max(args.concurrency))
        n_clients = math.ceil(math.ceil(max(args.concurrency) / size) / per_client)
        log(f"per-client session limit {per_client} (flag {'passed' if limit_flag else 'absent'}): "
            f"{size} client process(es), {n_clients} client model(s) each")
        start = time.monotonic()
        with ClientPool(size, model_path, swarm.initial_peers, n_clients, per_client, prompts, args) as pool:
            log(f"client processes ready in {time.monotonic() - start:.1f} s")
            out["concurrency"] = concurrency_runs(pool, per_client, client, peers, config,
                                                  {**pids, **pool.pids}, args)
        # TTFT last: its long prefill would otherwise set the peers' peak device memory read above
        out["ttft"] = ttft_runs(client, ttft_prompt, args.repeats, "swarm")
    finally:
        client.shutdown()
    return out


def run(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)  # the load average at the start
    model_path, local = prepare_model(args, work)
    config = local.config
    if not 1 <= args.peers <= config.num_hidden_layers:
        raise SystemExit(f"--peers: {args.peers} peers cannot split {config.num_hidden_layers} blocks")
    seeded = torch.Generator().manual_seed(0)
    vocab, sessions = config.vocab_size, max(args.concurrency)
    prompts = torch.randint(4, vocab, (sessions, args.prompt_tokens), generator=seeded).to(args.device)
    ttft_prompt = torch.randint(4, vocab, (1, args.ttft_prompt_tokens), generator=seeded).to(args.device)
    runs, steps_ms, local_tokens = timed_runs(local, prompts[:1], args, "local")
    local_ttft = ttft_runs(local, ttft_prompt, args.repeats, "local")
    # every session's reference tokens: all prompts in one local generate (equal lengths, no padding)
    batched = local.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    local_all = batched[:, args.prompt_tokens :].tolist()
    with LocalSwarm(str(model_path), startup_timeout_s=args.startup_timeout_s,
                    peer_threads=args.threads) as swarm:
        sw = measure_swarm(swarm, model_path, config, prompts, ttft_prompt, args)
    # local again, after the swarm: its decode figure is the median over both sets of runs
    runs_after, steps_after, _ = timed_runs(local, prompts[:1], args, "local (again)")

    conc = sw["concurrency"]
    alone = conc[1]["tokens"][0]
    for r in conc.values():
        r["aggregate_over_c1"] = round(r["aggregate_tokens_s"] / conc[1]["aggregate_tokens_s"], 4)
        tokens = r.pop("tokens")
        r["tokens_equal_alone"] = tokens[0] == alone
        r["sessions_equal_local"] = sum(t == local_all[i] for i, t in enumerate(tokens))
    kv = conc[max(conc)].pop("kv_memory")
    local_fig, swarm_fig = figures(runs + runs_after, steps_ms + steps_after), figures(*sw["single"][:2])
    ttft = {"prompt_tokens": args.ttft_prompt_tokens, "local_s": round(statistics.median(local_ttft), 4),
            "swarm_s": round(statistics.median(sw["ttft"]), 4), "local_runs_s": local_ttft,
            "swarm_runs_s": sw["ttft"]}
    ttft["swarm_over_local"] = round(ttft["swarm_s"] / ttft["local_s"], 3)
    local_rate, swarm_rate = local_fig["decode_tokens_s"], swarm_fig["decode_tokens_s"]

    def per_c(key: str) -> dict:
        return {str(c): r[key] for c, r in conc.items()}

    return {
        "benchmark": "serving", "machine": machine, "model": model_info(config, model_path),
        "settings": {
            "dtype": args.dtype, "peers": args.peers, "spans": sw["spans"], "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "ttft_prompt_tokens": args.ttft_prompt_tokens, "greedy": True,
            "max_sessions_per_client_flag": sw["max_sessions_per_client_flag"],
            "sessions_per_client": sw["sessions_per_client"], "client_procs": args.client_procs,
            "peer_flags": args.peer_flags,
        },
        "single_stream": {"local": local_fig, "swarm": swarm_fig,
                          "tokens_equal_local": sw["single"][2] == local_tokens,
                          "session_tokens_equal_local": alone == local_tokens},
        "ttft": ttft,
        "concurrency": {str(c): r for c, r in conc.items()},
        "kv_memory": {"sessions": max(conc), "peers": kv},
        "summary": {
            "local_decode_tokens_s": round(local_rate, 2), "swarm_decode_tokens_s": round(swarm_rate, 2),
            "swarm_over_local_tokens_s": round(swarm_rate / local_rate, 4),
            "aggregate_tokens_s": per_c("aggregate_tokens_s"),
            "aggregate_over_c1": per_c("aggregate_over_c1"),
            "step_ms_p50": per_c("step_ms_p50"), "step_ms_p99": per_c("step_ms_p99"),
            "step_ms_max": per_c("step_ms_max"), "client_procs": per_c("client_procs"),
            "client_procs_cores_busy": per_c("client_procs_cores_busy"),
            "segments_per_forward": {str(c): [p["segments_per_forward"] for p in r["batching"]]
                                     for c, r in conc.items()},
            "tokens_equal_alone": all(r["tokens_equal_alone"] for r in conc.values()),
            "sessions_equal_local": {str(c): f"{r['sessions_equal_local']}/{c}" for c, r in conc.items()},
            "ttft_s": {k: ttft[k] for k in ("local_s", "swarm_s", "swarm_over_local")},
            "kv_used_over_theory": {m["span"]: m["used_over_theory"] for m in kv},
            "kv_device_over_theory": {m["span"]: m["device_over_theory"] for m in kv},
        },
    }


def main(argv=None) -> int:
    return bench_decode.run_benchmark(parse_args(argv), run, "bench_serving.")


if __name__ == "__main__":
    sys.exit(main())
