"""The client's one small window onto the network: DHT reads, opening a stream, one request/response.

Routing and sessions speak only to `Transport`, so a second backend (pure-Python py-libp2p, for
platforms where the Go daemon has no build) can replace `HivemindTransport` without touching them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from hivemind.p2p import PeerID

from swarm import records
from swarm.admission import raise_refusal
from swarm.direct import DirectDialer
from swarm.errors import PeerError, PeerRefused, VersionMismatch
from swarm.identity import Identity
from swarm.net import NodeSettings, connect, start_dht, start_p2p, stop_node
from swarm.protocol import INFO_HANDLER, read_message, write_message
from swarm.swarmkey import SwarmKey

logger = logging.getLogger(__name__)

DIRECT_TIMEOUT_S = 3.0  # a direct stream not open by then: p2pd instead (a firewall may drop the packets)


class Transport(Protocol):
    async def fetch_blocks(self, model_id: str, num_blocks: int) -> dict[int, dict[str, records.BlockRecord]]: ...

    async def open_stream(
        self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    async def request(self, peer_id: str, addrs: Sequence[str], handler: str, message: dict, timeout_s: float) -> dict: ...

    async def shutdown(self) -> None: ...


class HivemindTransport:
    """Transport over hivemind's p2pd and a client-mode DHT node, living in the caller's event loop.

    Streams go straight to a peer's direct TLS port (swarm.direct) when its latest DHT record announces
    one and it answers (`direct`: True), else through p2pd; a direct address that failed is skipped for a
    while. The direct streams are authenticated with the same identity key as p2pd's. With a `swarm_key`
    (a private swarm) every DHT request and every stream shows it (swarm.admission)."""

    def __init__(self, p2p, dht, dialer: DirectDialer | None = None):
        self.p2p = p2p
        self.dht = dht
        self.dialer = dialer
        self._direct: dict[str, tuple[str, ...]] = {}  # peer id -> its direct addresses, from its records

    @classmethod
    async def create(
        cls, initial_peers: Sequence[str], timeout_s: float = 30.0, *, direct: bool = True,
        swarm_key: SwarmKey | None = None,
    ) -> HivemindTransport:
        identity = Identity.load_or_create(None)
        settings = NodeSettings(
            initial_peers=tuple(initial_peers), client_mode=True, startup_timeout_s=timeout_s,
            identity_path=identity.p2pd_identity_path, swarm_key=swarm_key,
        )
        try:
            p2p = await start_p2p(settings)
        finally:
            identity.close()
        try:
            dht = await start_dht(p2p, settings, records.make_record_validator(identity))
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p, dht, DirectDialer(identity.private_key, swarm_key) if direct else None)

    async def fetch_blocks(self, model_id: str, num_blocks: int) -> dict[int, dict[str, records.BlockRecord]]:
        found = await records.fetch_blocks(self.dht, model_id, num_blocks)
        for block_records in found.values():
            for peer, record in block_records.items():
                self._direct[peer] = record.direct
        return found

    async def open_stream(self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float):
        direct = self._direct.get(peer_id)
        if direct and self.dialer is not None:
            opened = await self.dialer.open_any(peer_id, direct, handler, min(timeout_s, DIRECT_TIMEOUT_S))
            if opened is not None:
                return opened
        pid = PeerID.from_base58(peer_id)
        try:
            if addrs:
                await connect(self.p2p, pid, addrs, timeout_s)
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(pid, handler), timeout=timeout_s
            )
        except TimeoutError:
            raise PeerError(f"could not open {handler} within {timeout_s} s", peer=peer_id) from None
        except Exception as e:  # p2pd reports dial and protocol failures as generic errors with text
            if "protocol" in str(e).lower() and "not supported" in str(e).lower():
                raise VersionMismatch(await self._explain_version(peer_id, addrs, handler, timeout_s)) from e
            raise PeerError(f"could not open {handler}: {e}", peer=peer_id) from e
        return reader, writer

    async def _explain_version(self, peer_id: str, addrs, handler: str, timeout_s: float) -> str:
        try:
            info = await self.request(peer_id, addrs, INFO_HANDLER, {"type": "info"}, timeout_s)
            speaks = info.get("handlers")
        except Exception:  # the info call may itself be unsupported; the message below still helps
            speaks = None
        return f"peer {peer_id} does not speak {handler}" + (f"; it speaks {speaks}" if speaks else "")

    async def request(self, peer_id: str, addrs: Sequence[str], handler: str, message: dict, timeout_s: float) -> dict:
        reader, writer = await self.open_stream(peer_id, addrs, handler, timeout_s)
        try:
            await write_message(writer, message)
            reply = await asyncio.wait_for(read_message(reader, 1 << 20), timeout=timeout_s)
        except TimeoutError:
            raise PeerError(f"no answer to {handler} within {timeout_s} s", peer=peer_id) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerError(f"stream closed during {handler}: {e}", peer=peer_id) from e
        finally:
            writer.close()
        raise_refusal(reply, f"{handler} of peer {peer_id}")
        if reply.get("type") == "error":
            raise PeerRefused(str(reply.get("message")), peer=peer_id)
        return reply

    async def shutdown(self) -> None:
        await stop_node(self.dht, self.p2p)
