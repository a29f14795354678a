"""Announcer: keeps this peer's DHT records fresh (state, span, load, cache left, measured throughput and
network figures, and while draining to move, the span it moves to).

Mutates nothing but the DHT. `announce(state)` stores one record per served block plus the model index
entry; `run()` repeats it every `announce_period_s` with records that expire after `record_ttl_s`, so a
peer that dies silently drops out of routes within about that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import swarm
from swarm import records
from swarm.protocol import PROTOCOL_MAJOR
from swarm.runtime.loading import config_hash, dtype_name
from swarm.runtime.quant import weight_bits

logger = logging.getLogger(__name__)

# A joining peer announces its span before loading it (so that peers starting together see each other's
# choice): its blocks' hashes are not known yet. Clients never route to joining peers; the record of an
# online peer always carries the hashes of the tensors it loaded.
UNLOADED_HASH = "00" * 16


def _precision_fields(server) -> dict:
    """quant, weight_bits and kv_dtype of the record (schema 1.3), from what the server was told to serve."""
    config = server.config
    quant = getattr(config, "quant", "none")
    return {"quant": quant, "weight_bits": weight_bits(quant, server.dtype),
            "kv_dtype": getattr(config, "kv_dtype", "auto")}


class Announcer:
    def __init__(self, server):
        self.server = server

    def _block_template(self, state: str) -> records.BlockRecord:
        s = self.server
        loaded = s.span_model is not None and s.span_model.span == s.span
        draining = state == "draining"
        next_span = getattr(s, "next_span", None) if draining else None
        network = getattr(s, "network", None)
        return records.BlockRecord(
            model_id=s.model_id, block=s.span.start, state=records.BlockState(state),
            start=s.span.start, end=s.span.end, software_version=swarm.__version__, protocol=PROTOCOL_MAJOR,
            dtype=dtype_name(s.dtype), block_hash=UNLOADED_HASH,
            compute_tokens_s=s.compute_tokens_s, network_mbps=network.mbps if network else 0.0,
            rtt_ms=network.rtt_ms if network else None,
            cache_tokens_left=max(0, s.sessions.cache_tokens_left) if loaded else 0,
            active_sessions=s.sessions.active if loaded else 0,
            queued_tokens=s.scheduler.queued_tokens if loaded else 0,
            public_name=s.config.public_name, addrs=tuple(s.addrs[: records.MAX_ADDRS]),
            direct=tuple(s.direct_addrs[: records.MAX_ADDRS]),
            drain_deadline=s.drain_deadline if draining else None,
            next_start=next_span.start if next_span else None, next_end=next_span.end if next_span else None,
            **_precision_fields(s),
        )

    async def announce(self, state: str) -> None:
        s = self.server
        template = self._block_template(state)
        ttl = s.config.record_ttl_s
        loaded = s.span_model is not None and s.span_model.span == s.span
        per_block = [
            dataclasses.replace(template, block=block,
                                block_hash=s.span_model.block_hashes[i] if loaded else UNLOADED_HASH)
            for i, block in enumerate(range(s.span.start, s.span.end))
        ]
        stored = await records.announce_records(s.dht, s.identity, per_block, ttl)
        if not any(stored):  # nobody holds this peer's records: clients stop seeing it once the old ones expire
            logger.warning("announce %s: no DHT node confirmed any of the %d block records (routing table %d nodes,"
                           " %d suspended)", state, len(stored), len(s.dht.protocol.routing_table.uid_to_peer_id),
                           len(s.dht.blacklist.banned_peers))
        elif not all(stored):
            logger.info("announce %s: %d of %d block records confirmed", state, sum(stored), len(stored))
        model = records.ModelRecord(
            model_id=s.model_id, num_blocks=s.model_config.num_hidden_layers,
            repository=s.model_id, config_hash=config_hash(s.model_config),
        )
        await records.announce_model(s.dht, s.identity, model, ttl)

    async def run(self) -> None:
        """Heartbeat until cancelled. A failed round is logged and retried at the next period."""
        period = self.server.config.announce_period_s
        while True:
            await asyncio.sleep(period)
            started = time.monotonic()
            try:
                await self.announce(self.server.state)
            except Exception:
                logger.exception("announce failed; retrying in %.0f s", period)
            logger.debug("announce took %.2f s", time.monotonic() - started)
