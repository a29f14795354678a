"""Crawler: builds a Snapshot of the swarm every refresh (the imperative shell around summary.py).

One crawl: read the model index, then every model's block records (concurrently), then probe every
peer's `info` and read the report records on it (swarm.records.ReportRecord; concurrently, at most
`max_concurrent_probes` at once, each bounded by
`probe_timeout_s`). Every DHT read is bounded by `dht_timeout_s`, so a crawl always ends.

Mutates only its own `last_seen` memory (peer id -> unix time of the latest answered probe, dropped for
peers no longer on the DHT). Never raises from `run()`: a failed crawl is logged with its traceback,
and its error is carried in the next Snapshot so the page says the data is stale.

On either network backend: `dht` and `p2p` are hivemind's DHTNode and P2P, or a swarm.lite LiteNode's
`dht` (which swarm.records reads through as through a DHTNode) and the LiteNode itself (which probes
peers over py-libp2p); no hivemind is imported then.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from bootstrap.health.config import HealthConfig
from bootstrap.health.snapshot import ModelSnapshot, Probe, Snapshot
from swarm import records
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


class Crawler:
    def __init__(self, dht: Any, p2p: Any, config: HealthConfig, clock: Callable[[], float] = time.time):
        self.dht = dht
        self.p2p = p2p
        self.config = config
        self.clock = clock
        self._last_seen: dict[str, float] = {}

    async def run(self, publish: Callable[[Snapshot], None]) -> None:
        """Crawl every `refresh_s` (start to start) and publish each snapshot, until cancelled."""
        last_good = Snapshot()
        while True:
            started = time.monotonic()
            try:
                last_good = await self.crawl()
                publish(last_good)
            except Exception as e:  # supervisor loop: keep serving the last good data, say it is stale
                logger.exception("health crawl failed; keeping the previous snapshot")
                publish(
                    Snapshot(
                        last_good.taken_at,
                        last_good.models,
                        last_good.probes,
                        time.monotonic() - started,
                        f"{type(e).__name__}: {e}"[:300],
                    )
                )
            await asyncio.sleep(max(0.0, self.config.refresh_s - (time.monotonic() - started)))

    async def crawl(self) -> Snapshot:
        started = time.monotonic()
        timeout_s = self.config.dht_timeout_s
        by_model = self._bounded_index(await records.fetch_models(self.dht, timeout_s=timeout_s))
        fetched = await asyncio.gather(
            *(
                records.fetch_blocks(
                    self.dht, model_id, max(r.num_blocks for r in entries), timeout_s=timeout_s
                )
                for model_id, entries in by_model.items()
            )
        )
        net = sys.modules.get("swarm.net")  # loaded on the hivemind backend only
        if net is not None:
            for blocks in fetched:
                net.remember_addrs(self.dht, blocks)  # so the next crawl reaches the nodes these peers run
        models = {
            model_id: ModelSnapshot(index=tuple(entries), blocks=blocks)
            for (model_id, entries), blocks in zip(by_model.items(), fetched, strict=True)
        }
        peers = _peer_addrs(models)
        probes, reports = await asyncio.gather(
            self._probe_all(peers), records.fetch_reports(self.dht, list(peers), timeout_s=timeout_s)
        )
        return Snapshot(
            taken_at=self.clock(), models=models, probes=probes, crawl_s=time.monotonic() - started,
            reports=reports,
        )

    def _bounded_index(self, index: list[records.ModelRecord]) -> dict[str, list[records.ModelRecord]]:
        """{model_id: its index entries}, within the config's bounds: anyone may announce a model, and one
        claiming a million blocks (or ten thousand model ids) must not make every crawl a million lookups.
        Over the bounds, entries are dropped (logged); the models most peers announce are kept."""
        by_model: dict[str, list[records.ModelRecord]] = {}
        for record in index:
            if record.num_blocks <= self.config.max_blocks_per_model:
                by_model.setdefault(record.model_id, []).append(record)
            else:
                logger.info("ignoring %s: it claims %d blocks", record.model_id, record.num_blocks)
        if len(by_model) > self.config.max_models:
            logger.info(
                "%d models announced; showing the %d most announced", len(by_model), self.config.max_models
            )
            kept = sorted(by_model, key=lambda m: (-len(by_model[m]), m))[: self.config.max_models]
            by_model = {m: by_model[m] for m in sorted(kept)}
        return by_model

    async def _probe_all(self, peers: dict[str, list[str]]) -> dict[str, Probe]:
        limit = asyncio.Semaphore(self.config.max_concurrent_probes)

        async def probe(peer_id: str, addrs: list[str]) -> Probe:
            async with limit:
                return await self._probe(peer_id, addrs)

        results = await asyncio.gather(*(probe(pid, addrs) for pid, addrs in peers.items()))
        self._last_seen = {pid: t for pid, t in self._last_seen.items() if pid in peers}
        return dict(zip(peers, results, strict=True))

    async def _probe(self, peer_id: str, addrs: list[str]) -> Probe:
        started = time.monotonic()
        try:
            if hasattr(self.p2p, "request_info"):  # a swarm.lite LiteNode
                info = await self.p2p.request_info(peer_id, addrs, self.config.probe_timeout_s)
            else:
                from swarm.probe import request_info  # hivemind's side

                info = await request_info(self.p2p, peer_id, addrs, self.config.probe_timeout_s)
        except SwarmError as e:
            return Probe(reachable=False, error=str(e)[:300], last_seen=self._last_seen.get(peer_id))
        rtt_s = time.monotonic() - started
        self._last_seen[peer_id] = self.clock()
        return Probe(reachable=True, rtt_s=rtt_s, info=info, last_seen=self._last_seen[peer_id])


def _peer_addrs(models: dict[str, ModelSnapshot]) -> dict[str, list[str]]:
    """{peer_id: the union of the addresses its records announce}, in first-seen order."""
    addrs: dict[str, dict[str, None]] = {}
    for model in models.values():
        for entries in model.blocks.values():
            for peer_id, record in entries.items():
                addrs.setdefault(peer_id, {}).update(dict.fromkeys(record.addrs))
    return {peer_id: list(a)[: records.MAX_ADDRS] for peer_id, a in addrs.items()}
