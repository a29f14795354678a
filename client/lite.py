"""LiteTransport: the client's Transport on py-libp2p (swarm.lite), for installs without hivemind.

`pip install swarm-llm[lite]` brings py-libp2p and trio, not hivemind (the two cannot share a process);
`ClientConfig(transport="lite")` picks it, and `transport="auto"` does where hivemind is not installed.

What it does as HivemindTransport does: records come from the swarm's own DHT nodes through their
find RPC, with the same owner-signature and schema checks (swarm.lite.dht, then records'
decoder); streams go to a peer's direct TLS port (swarm.direct, no libp2p at all) when its record
announces one and it answers, else over a libp2p stream dialed at the record's addresses (noise +
yamux, which every p2pd accepts). The identity is a fresh RSA key per transport, as the hivemind
client's ephemeral one, and the direct handshake proves the same key as the libp2p connection.

Public swarms only: with a swarm key, `create` raises ConfigError (swarm.lite.node says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from client.transport import DIRECT_TIMEOUT_S, StreamRequests
from swarm import records
from swarm.direct import DirectDialer
from swarm.errors import ConfigError
from swarm.lite.node import LiteNode
from swarm.swarmkey import SwarmKey

logger = logging.getLogger(__name__)


class LiteTransport(StreamRequests):
    """Transport (client.transport) over a LiteNode, living in the caller's event loop; the node's trio
    loop runs on a thread of its own (swarm.lite.bridge)."""

    def __init__(self, node: LiteNode, dialer: DirectDialer | None = None):
        self.node = node
        self.dialer = dialer
        self._direct: dict[str, tuple[str, ...]] = {}  # peer id -> its direct addresses, from its records

    @classmethod
    async def create(cls, initial_peers: Sequence[str], timeout_s: float = 30.0, *, direct: bool = True,
                     swarm_key: SwarmKey | None = None) -> LiteTransport:
        if swarm_key is not None:
            raise ConfigError("the lite transport does not join private swarms yet (their DHT needs "
                              "hivemind's signed access tokens); use transport='hivemind' for one")
        node = await LiteNode.start(initial_peers, timeout_s)
        return cls(node, DirectDialer(node.key) if direct else None)

    async def fetch_blocks(self, model_id: str, num_blocks: int) -> dict[int, dict[str, records.BlockRecord]]:
        found = await self.node.fetch_blocks(model_id, num_blocks)
        for block_records in found.values():
            for peer, record in block_records.items():
                self._direct[peer] = record.direct
        return found

    async def open_stream(self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        direct = self._direct.get(peer_id)
        if direct and self.dialer is not None:
            opened = await self.dialer.open_any(peer_id, direct, handler, min(timeout_s, DIRECT_TIMEOUT_S))
            if opened is not None:
                return opened
        return await self.node.open_stream(peer_id, addrs, handler, timeout_s)

    async def shutdown(self) -> None:
        await self.node.shutdown()
