"""Offline judgement of the harness's measurements: pure functions of what the workers reported.

Route quality, two ways, both over the peers of the snapshot the client planned with:

  planner model  The client priced each hop with the round trip it measured (an `info` request on a
                 fresh connection: TLS set-up and the peer's answer included) and every other term from
                 the records (client.routing.hop_cost_s). Offline we know the true injected delays: we
                 rebuild the candidates with latency = the true round trip client <-> peer, every other
                 field as the snapshot had it, let the same planner find the best route, and price the
                 client's route the same way. ratio = chosen / best >= 1.
  push path      What a decode step really waits for when peers push to each other (DESIGN 3.4): the
                 one-way delays client -> p1 -> ... -> pn -> client plus each hop's compute
                 (blocks / announced tokens/s). The best such route is a shortest path over (boundary,
                 last peer) states (`best_push_path`). The planner does not see peer-to-peer delays, so
                 this ratio tells how much a planner that did would gain.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.scale.links import Links
from client.routing import Candidate, CostModel, Hop, hop_cost_s, plan_route
from swarm.spans import Span


def candidates_true(snapshot: dict, links: Links, client_host: int, host_of: dict[str, int]) -> dict[str, Candidate]:
    out = {}
    for peer, r in snapshot.items():
        if peer not in host_of:
            continue
        out[peer] = Candidate(
            peer_id=peer, span=Span(r["start"], r["end"]), state=r["state"],
            compute_tokens_s=max(r["compute_tokens_s"], 1e-3), latency_s=links.rtt_s(client_host, host_of[peer]),
            active_sessions=r["active_sessions"], queued_tokens=r["queued_tokens"],
            cache_tokens_left=r["cache_tokens_left"],
        )
    return out


def route_cost_s(route: list[Hop], candidates: dict[str, Candidate], need_cache_tokens: int,
                 cost_model: CostModel | None = None) -> float:
    cost_model = cost_model or CostModel()
    return sum(hop_cost_s(candidates[h.peer_id], h.span, need_cache_tokens, cost_model) for h in route)


def push_path_s(route: list[Hop], candidates: dict[str, Candidate], links: Links, client_host: int,
                host_of: dict[str, int]) -> float:
    """One decode step through `route` with pushes: delays along client -> hops -> client, plus compute."""
    hosts = [client_host, *(host_of[h.peer_id] for h in route), client_host]
    delay = sum(links.delay_s(a, b) for a, b in zip(hosts, hosts[1:], strict=False))
    return delay + sum(h.span.length / candidates[h.peer_id].compute_tokens_s for h in route)


def best_push_path(candidates: dict[str, Candidate], num_blocks: int, links: Links, client_host: int,
                   host_of: dict[str, int]) -> tuple[float, list[Hop]]:
    """The cheapest push path over online candidates covering [0, num_blocks), cutting only where some
    span starts or ends (as the planner does); (inf, []) if none covers."""
    usable = [c for c in candidates.values() if c.state == "online"]
    bounds = sorted({0, num_blocks} | {c.span.start for c in usable} | {c.span.end for c in usable})
    bounds = [b for b in bounds if 0 <= b <= num_blocks]
    # end[k][i]: (cost, back) of the best chain that ends with candidate i exactly at boundary k
    end: list[dict[int, tuple[float, tuple | None]]] = [dict() for _ in bounds]
    hosts = [host_of[c.peer_id] for c in usable]
    for k, b in enumerate(bounds[:-1]):
        if k == 0:
            enter = {j: (links.delay_s(client_host, hosts[j]), None) for j in range(len(usable))}
        elif end[k]:
            enter = {}
            for j in range(len(usable)):
                i, (cost, _) = min(end[k].items(), key=lambda item: item[1][0] + links.delay_s(hosts[item[0]], hosts[j]))
                enter[j] = (cost + links.delay_s(hosts[i], hosts[j]), (k, i))
        else:
            continue
        for j, (cost, back) in enter.items():
            c = usable[j]
            if not c.span.start <= b < c.span.end:
                continue
            for m in range(k + 1, len(bounds)):
                if bounds[m] > c.span.end:
                    break
                total = cost + (bounds[m] - b) / c.compute_tokens_s
                if j not in end[m] or total < end[m][j][0]:
                    end[m][j] = (total, back)
    last = len(bounds) - 1
    if not end[last]:
        return math.inf, []
    j, (cost, back) = min(end[last].items(), key=lambda item: item[1][0] + links.delay_s(hosts[item[0]], client_host))
    best = cost + links.delay_s(hosts[j], client_host)
    hops, m = [], last
    while True:
        k = back[0] if back else 0
        hops.append(Hop(usable[j].peer_id, Span(bounds[k], bounds[m])))
        if back is None:
            break
        m, j = back
        back = end[m][j][1]
    return best, hops[::-1]


def route_ratio(generation: dict, links: Links, client_host: int, host_of: dict[str, int],
                num_blocks: int, model_id: str) -> dict | None:
    """Both ratios for one reported generation, or None if it cannot be judged (a recovery changed the
    route, or a hop's peer is missing from the snapshot)."""
    if generation.get("recoveries") or not generation.get("snapshot"):
        return None
    cands = candidates_true(generation["snapshot"], links, client_host, host_of)
    route = [Hop(peer, Span(start, end)) for peer, start, end in generation["route"]]
    if any(h.peer_id not in cands for h in route):
        return None
    need = generation["max_length"]
    best = plan_route(cands.values(), num_blocks, model_id=model_id, need_cache_tokens=need)
    chosen_s, best_s = route_cost_s(route, cands, need), route_cost_s(best, cands, need)
    push_chosen = push_path_s(route, cands, links, client_host, host_of)
    push_best, _ = best_push_path(cands, num_blocks, links, client_host, host_of)
    steps = generation.get("step_s") or []
    return {"chosen_s": chosen_s, "best_s": best_s, "ratio": chosen_s / best_s, "hops": len(route),
            "best_hops": len(best), "push_chosen_s": push_chosen, "push_best_s": push_best,
            "push_ratio": push_chosen / push_best,
            "step_s": statistics.median(steps) if steps else None}


def rtt_ratios(generation: dict, links: Links, client_host: int, host_of: dict[str, int]) -> list[float]:
    """Measured / injected round trip for every peer the client pinged."""
    return [rtt / links.rtt_s(client_host, host_of[peer]) for peer, rtt in generation.get("latencies", {}).items()
            if peer in host_of]


def distribution(values: list[float], digits: int = 4) -> dict:
    """n, min, p50, p90, max, mean of a sample; empty sample -> {"n": 0}."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"n": len(ordered), "min": round(ordered[0], digits), "p50": round(pct(0.5), digits),
            "p90": round(pct(0.9), digits), "max": round(ordered[-1], digits),
            "mean": round(statistics.fmean(ordered), digits)}


def coverage(peers: dict[str, list], num_blocks: int, alive=None) -> list[int]:
    """Online peers per block, from {peer: [start, end, state]}; `alive`: count only these peers."""
    counts = [0] * num_blocks
    for peer, (start, end, state) in peers.items():
        if state == "online" and (alive is None or peer in alive):
            for b in range(max(0, start), min(end, num_blocks)):
                counts[b] += 1
    return counts
