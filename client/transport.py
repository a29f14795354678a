"""The client's one small window onto the network: DHT reads, opening a stream, one request/response.

Routing and sessions speak only to `Transport`. Two backends: `HivemindTransport` (hivemind's p2pd and
a DHT node) and `client.lite.LiteTransport` (pure-Python py-libp2p, for platforms where the Go daemon
has no build). They cannot share a process (both register libp2p's protobuf types), so this module
imports no hivemind at module level; `make_transport` picks one (ClientConfig.transport).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from swarm import records
from swarm.admit import raise_refusal
from swarm.direct import DirectDialer
from swarm.errors import PeerError, PeerRefused, VersionMismatch
from swarm.lite import backend
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

    async def timed_request(self, peer_id: str, addrs: Sequence[str], handler: str, message: dict,
                            timeout_s: float) -> tuple[dict, float]: ...

    async def shutdown(self) -> None: ...


async def make_transport(name: str, initial_peers: Sequence[str], timeout_s: float, *, direct: bool = True,
                         swarm_key: SwarmKey | None = None) -> Transport:
    """The started transport `name` ("auto", "hivemind", "lite": swarm.lite.backend) joined to the swarm
    through `initial_peers`. ConfigError when that backend is not installed."""
    if backend(name) == "lite":
        from client.lite import LiteTransport

        return await LiteTransport.create(initial_peers, timeout_s, direct=direct, swarm_key=swarm_key)
    return await HivemindTransport.create(initial_peers, timeout_s, direct=direct, swarm_key=swarm_key)


class StreamRequests:
    """`request` and `timed_request` over a backend's `open_stream` (both transports share them)."""

    async def open_stream(self, peer_id: str, addrs: Sequence[str], handler: str, timeout_s: float):
        raise NotImplementedError

    async def request(self, peer_id: str, addrs: Sequence[str], handler: str, message: dict,
                      timeout_s: float) -> dict:
        return (await self.timed_request(peer_id, addrs, handler, message, timeout_s))[0]

    async def timed_request(self, peer_id: str, addrs: Sequence[str], handler: str, message: dict,
                            timeout_s: float) -> tuple[dict, float]:
        """`request`, and the seconds from sending the message to its reply: one round trip on an open
        stream, without the dial and handshakes before it (several round trips on a fresh connection)."""
        reader, writer = await self.open_stream(peer_id, addrs, handler, timeout_s)
        try:
            await write_message(writer, message)
            sent = time.monotonic()
            reply = await asyncio.wait_for(read_message(reader, 1 << 20), timeout=timeout_s)
            round_trip_s = time.monotonic() - sent
        except TimeoutError:
            raise PeerError(f"no answer to {handler} within {timeout_s} s", peer=peer_id) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerError(f"stream closed during {handler}: {e}", peer=peer_id) from e
        finally:
            writer.close()
        raise_refusal(reply, f"{handler} of peer {peer_id}")
        if reply.get("type") == "error":
            raise PeerRefused(str(reply.get("message")), peer=peer_id)
        return reply, round_trip_s

    async def explain_version(self, peer_id: str, addrs, handler: str, timeout_s: float) -> str:
        """What to say when `peer_id` does not speak `handler`: what it does speak, if it says."""
        try:
            info = await self.request(peer_id, addrs, INFO_HANDLER, {"type": "info"}, timeout_s)
            speaks = info.get("handlers")
        except Exception:  # the info call may itself be unsupported; the message below still helps
            speaks = None
        return f"peer {peer_id} does not speak {handler}" + (f"; it speaks {speaks}" if speaks else "")


class HivemindTransport(StreamRequests):
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
        from swarm.identity import Identity
        from swarm.net import NodeSettings, start_dht, start_p2p

        identity = Identity.load_or_create(None)  # ephemeral: no running node can hold it
        settings = NodeSettings(
            initial_peers=tuple(initial_peers), client_mode=True, startup_timeout_s=timeout_s,
            identity_path=identity.p2pd_identity_path, check_identity_free=False, swarm_key=swarm_key,
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
        transport = cls(p2p, dht, DirectDialer(identity.private_key, swarm_key) if direct else None)
        transport.identity = identity  # signs this client's DHT records (report records, client.verifier)
        return transport

    async def fetch_blocks(self, model_id: str, num_blocks: int) -> dict[int, dict[str, records.BlockRecord]]:
        from swarm.net import remember_addrs

        found = await records.fetch_blocks(self.dht, model_id, num_blocks)
        remember_addrs(self.dht, found)
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
        from hivemind.p2p import PeerID

        from swarm.net import connect

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
                raise VersionMismatch(await self.explain_version(peer_id, addrs, handler, timeout_s)) from e
            raise PeerError(f"could not open {handler}: {e}", peer=peer_id) from e
        return reader, writer

    async def shutdown(self) -> None:
        from swarm.net import stop_node

        await stop_node(self.dht, self.p2p)
