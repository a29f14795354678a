"""Clients, the monitor and the reference of the scale harness, each run by benchmarks.scale.run (the first
two inside a namespace of their own). They speak JSON lines: events on stdout, commands on stdin.

    client     generates greedily through the real client library, prompt after prompt, once told "go"
               (until "pause" or "stop"). Per generation it reports the tokens, the route it planned first
               and the one it ended with, the DHT snapshot and round trips it planned with, the recoveries,
               per-token times, and how long each DHT snapshot fetch of the library took (the fetches the
               planner itself makes, timed by wrapping the transport's fetch_blocks; nothing extra).
    monitor    fetches the snapshot every --period-s (coverage over time; fetch time; how many DHT find
               RPCs one fetch took) while not paused ("pause" / "resume"); polls `info` of the peers it is
               told to watch ({"watch": {peer_id: addrs}}) every second and reports their steps served;
               {"steps": {peer_id: addrs}} asks each of those peers once.
    reference  prints local transformers' greedy tokens for every prompt (the expected output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time

from swarm.protocol import INFO_HANDLER

INFO_TIMEOUT_S = 5.0


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def commands() -> queue.Queue:
    """Lines of stdin, parsed: a JSON object, or a bare word as {"do": word}; EOF reads as stop."""
    q: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                q.put(json.loads(line) if line.startswith("{") else {"do": line})
        q.put({"do": "stop"})

    threading.Thread(target=read, daemon=True).start()
    return q


def describe(snapshot: dict | None) -> dict:
    """Per peer, what routing reads from its record (JSON-friendly)."""
    from client.swarmview import peer_records

    if not snapshot:
        return {}
    return {
        peer: {"start": r.start, "end": r.end, "state": r.state, "compute_tokens_s": r.compute_tokens_s,
               "active_sessions": r.active_sessions, "queued_tokens": r.queued_tokens,
               "cache_tokens_left": r.cache_tokens_left}
        for peer, r in peer_records(snapshot).items()
    }


# ---------------------------------------------------------------- client


class FetchTimer:
    """Wraps a transport's fetch_blocks: how long each took, and the last snapshot it returned (the one the
    planner holds: the library caches what it fetched)."""

    def __init__(self, transport):
        self.inner = transport.fetch_blocks
        self.times_s: list[float] = []
        self.last: dict | None = None
        transport.fetch_blocks = self

    async def __call__(self, model_id, num_blocks):
        started = time.monotonic()
        found = await self.inner(model_id, num_blocks)
        self.times_s.append(time.monotonic() - started)
        self.last = found
        return found


def run_client(args) -> None:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from client import ClientConfig, DistributedModelForCausalLM
    from client import loop as client_loop

    prompts = json.loads(args.prompts)
    config = ClientConfig(initial_peers=tuple(args.initial_peers), wait_for_route_s=args.wait_for_route_s)
    model = DistributedModelForCausalLM.from_pretrained(args.model, client_config=config)
    timer = FetchTimer(client_loop.run(model.transport(), timeout_s=120))
    inbox = commands()
    emit("client_ready")

    class Steps(BaseStreamer):
        """Times every token; reports the route once the prompt has gone through (first token)."""

        def __init__(self, session, prompt):
            self.session, self.prompt, self.times = session, prompt, []

        def put(self, value):
            self.times.append(time.monotonic())
            if len(self.times) == 2:
                emit("gen_route", prompt=self.prompt, route=_route(self.session))

        def end(self):
            pass

    running, count = False, 0
    try:
        while True:
            try:
                command = inbox.get(timeout=None if not running else 0)
            except queue.Empty:
                command = None
            if command is not None:
                what = command.get("do")
                if what == "stop":
                    break
                running = {"go": True, "pause": False}.get(what, running)
                continue
            k = (args.index + count * args.clients) % len(prompts)
            count += 1
            ids = torch.tensor([prompts[k]])
            fetches_before = len(timer.times_s)
            emit("gen_start", prompt=k)
            started = time.monotonic()
            try:
                with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as session:
                    steps = Steps(session, k)
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                         do_sample=False, pad_token_id=0, eos_token_id=None, streamer=steps)
                    route, recoveries = _route(session), session.recoveries
            except Exception as e:  # reported; the harness counts failures, and the next prompt goes on
                emit("gen_failed", prompt=k, error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - started)
                continue
            gaps = [b - a for a, b in zip(steps.times[1:], steps.times[2:], strict=False)]
            emit("generation", prompt=k, tokens=out[0, ids.shape[1]:].tolist(), seconds=time.monotonic() - started,
                 first_token_s=steps.times[1] - started if len(steps.times) > 1 else None, step_s=gaps,
                 route=route, recoveries=recoveries, fetch_s=timer.times_s[fetches_before:],
                 snapshot=describe(timer.last), latencies=model.latencies.known(),
                 max_length=ids.shape[1] + args.max_new_tokens)
    finally:
        model.shutdown()


def _route(session) -> list:
    return [[h.peer_id, h.span.start, h.span.end] for h in session.route]


# ---------------------------------------------------------------- monitor


class FindCounter:
    """Counts the DHT find RPCs a node makes (benchmark instrumentation of hivemind's DHTNode)."""

    def __init__(self, node):
        self.inner = node.protocol.call_find
        self.calls = 0
        self.nodes: set = set()
        self.answered_ms: list[float] = []  # how long each answered call took
        node.protocol.call_find = self

    async def __call__(self, peer_id, queries):
        self.calls += 1
        self.nodes.add(peer_id)
        started = time.monotonic()
        response = await self.inner(peer_id, queries)
        if response:
            self.answered_ms.append((time.monotonic() - started) * 1000)
        return response

    def take(self) -> tuple[int, int, list[float]]:
        calls, nodes, answered = self.calls, len(self.nodes), sorted(self.answered_ms)
        self.calls, self.nodes, self.answered_ms = 0, set(), []
        return calls, nodes, answered


async def monitor(args) -> None:
    from client.swarmview import peer_records
    from client.transport import HivemindTransport
    from swarm.spans import default_model_id

    inbox = commands()
    transport = await HivemindTransport.create(args.initial_peers, 60.0)
    finds = FindCounter(transport.dht)
    model_id = default_model_id(args.model)
    paused = False
    watched: dict[str, list[str]] = {}
    last_fetch = 0.0
    emit("monitor_ready")
    try:
        while True:
            while not inbox.empty():
                command = inbox.get()
                what = command.get("do")
                if what == "stop":
                    return
                paused = {"pause": True, "resume": False}.get(what, paused)
                watched.update(command.get("watch", {}))
                for peer in command.get("unwatch", []):
                    watched.pop(peer, None)
                if "steps" in command:
                    emit("steps", served=await _info_of(transport, command["steps"]))
            started = time.monotonic()
            if not paused and started - last_fetch >= args.period_s:
                last_fetch = started
                finds.take()
                snapshot = await transport.fetch_blocks(model_id, args.num_blocks)
                fetch_s = time.monotonic() - started
                calls, nodes, answered = finds.take()
                records = peer_records(snapshot)
                emit("snapshot", fetch_s=fetch_s, find_rpcs=calls, find_nodes=nodes, find_answered=len(answered),
                     find_ms_median=round(answered[len(answered) // 2], 1) if answered else None,
                     find_ms_max=round(answered[-1], 1) if answered else None,
                     table=len(transport.dht.protocol.routing_table.uid_to_peer_id),
                     suspended=len(transport.dht.blacklist.banned_peers),
                     peers={p: [r.start, r.end, r.state] for p, r in records.items()})
            if watched:
                emit("watch", served=await _info_of(transport, watched))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        await transport.shutdown()


async def _info_of(transport, addrs: dict[str, list[str]]) -> dict:
    """{peer: {"served", "active", "span", "state"}} from `info`; None for a peer that did not answer."""

    async def ask(peer):
        try:
            info = await transport.request(peer, list(addrs[peer]), INFO_HANDLER, {"type": "info"}, INFO_TIMEOUT_S)
        except Exception:  # an unreachable peer reports None; the harness reads only those that answer
            return peer, None
        return peer, {"served": info.get("steps", {}).get("served"), "active": info.get("active_sessions"),
                      "span": info.get("span"), "state": info.get("state")}

    return dict(await asyncio.gather(*(ask(p) for p in addrs)))


# ---------------------------------------------------------------- reference


def run_reference(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(args.model).eval()
    out = []
    with torch.inference_mode():
        for prompt in json.loads(args.prompts):
            ids = torch.tensor([prompt])
            tokens = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
            out.append(tokens[0, ids.shape[1]:].tolist())
    emit("reference", tokens=out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["client", "monitor", "reference"])
    p.add_argument("--model", required=True)
    p.add_argument("--initial-peers", nargs="+", default=[])
    p.add_argument("--prompts", default="[]", help="JSON list of prompts (token id lists)")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--wait-for-route-s", type=float, default=120.0)
    p.add_argument("--num-blocks", type=int, default=0)
    p.add_argument("--period-s", type=float, default=2.0)
    args = p.parse_args()
    if args.mode == "client":
        run_client(args)
    elif args.mode == "monitor":
        asyncio.run(monitor(args))
    else:
        run_reference(args)


if __name__ == "__main__":
    main()
