"""Reachability check: can others dial this peer directly at this address?

A peer asks at start-up (GET /api/v1/reachability?peer=<id>&addr=<multiaddr>). The answer must not
be fooled by a connection that already exists: a peer that joined the DHT through this bootstrap is
already connected to the bootstrap's p2pd (it dialed out), and p2pd reuses that connection for any
"connect". So each check dials from a fresh *probe* p2pd that knows nobody (see ReachabilityChecker).
Success means: a TCP dial to exactly that address reached that peer id, and the peer answered `info`.

`parse_request` is pure (the address rules); `ReachabilityChecker` runs the dial.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass

from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError

from swarm.errors import ConfigError, PeerError, ProtocolError
from swarm.net import NodeSettings, start_p2p
from swarm.probe import check_peer_id, request_info
from swarm.swarmkey import SwarmKey

logger = logging.getLogger(__name__)

MAX_ADDR_CHARS = 256


@dataclass(frozen=True)
class CheckRequest:
    peer_id: str
    addr: str  # transport address only: /ip4|ip6/<ip>/tcp/<port>


@dataclass(frozen=True)
class Verdict:
    reachable: bool
    detail: str
    rtt_s: float | None = None


def parse_request(peer: object, addr: object, remote_ip: str | None, same_ip_only: bool) -> CheckRequest:
    """Validate a check request; ProtocolError (-> 400) says what is wrong, PermissionError (-> 403) why not.

    The address must be /ip4 or /ip6 + /tcp (a relay circuit proves nothing about direct dials), may end
    in /p2p/<the same peer id>, and with `same_ip_only` must name the IP the request came from.
    """
    if peer is None or addr is None:
        raise ProtocolError("give both 'peer' (a peer id) and 'addr' (the multiaddr others should dial)")
    peer_id = check_peer_id(peer).to_base58()
    if type(addr) is not str or len(addr) > MAX_ADDR_CHARS:
        raise ProtocolError(f"'addr' must be a multiaddr of at most {MAX_ADDR_CHARS} characters")
    try:
        protocols = [(p.name, value) for p, value in Multiaddr(addr).items()]
    except (MultiaddrError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ProtocolError(f"'addr' {addr[:80]!r} is not a valid multiaddr") from e
    if protocols and protocols[-1][0] == "p2p":
        if protocols[-1][1] != peer_id:
            raise ProtocolError(f"'addr' ends in /p2p/{protocols[-1][1]}, not the peer id {peer_id}")
        protocols = protocols[:-1]
    if len(protocols) != 2 or protocols[0][0] not in ("ip4", "ip6") or protocols[1][0] != "tcp":
        raise ProtocolError(
            f"'addr' {addr[:80]!r} must be /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port> (a relayed or DNS "
            "address says nothing about direct dials)"
        )
    ip = ipaddress.ip_address(protocols[0][1])
    if same_ip_only and not _same_ip(ip, remote_ip):
        raise PermissionError(
            f"this server checks only the address your request came from ({remote_ip}), not {ip}; "
            "ask from the machine that runs the peer"
        )
    return CheckRequest(peer_id=peer_id, addr=f"/{protocols[0][0]}/{ip}/tcp/{protocols[1][1]}")


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, remote_ip: str | None) -> bool:
    try:
        remote = ipaddress.ip_address(remote_ip or "")
    except ValueError:
        return False
    if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped:
        remote = remote.ipv4_mapped
    return remote == ip


class ReachabilityChecker:
    """Runs each check from its own fresh probe p2pd, shut down right after.

    Fresh per check, because a p2pd that ever connected to a swarm member knows more than the address
    under test: its peerstore and its libp2p DHT routing table would let it find the peer elsewhere
    (through relays or other addresses), and a dial to a wrong address would still "succeed". A fresh
    daemon knows nobody, so the only way to the peer is the address given. Costs a daemon start (well
    under a second) per check; checks come once per peer start-up, at most `max_concurrent` at once.
    """

    def __init__(self, timeout_s: float, swarm_key: SwarmKey | None = None):
        self.timeout_s = timeout_s
        self.swarm_key = swarm_key  # a private swarm's peers admit only probes that show it

    async def check(self, request: CheckRequest) -> Verdict:
        """Dial `request.addr`, ask `info`. A failed dial is the verdict, not an exception; PeerError only
        if the probe daemon itself cannot start."""
        try:
            p2p = await start_p2p(NodeSettings(client_mode=True, startup_timeout_s=max(self.timeout_s, 15.0),
                                               swarm_key=self.swarm_key))
        except ConfigError as e:
            raise PeerError(f"the health server could not start its probe daemon: {e}") from e
        try:
            started = time.monotonic()
            await request_info(p2p, request.peer_id, [request.addr], self.timeout_s)
            rtt_s = time.monotonic() - started
        except (PeerError, ProtocolError) as e:
            return Verdict(False, _advice(request.addr, str(e)))
        finally:
            await p2p.shutdown()
        return Verdict(
            True, f"dialed {request.addr} directly and the peer answered in {rtt_s * 1000:.0f} ms", rtt_s
        )

    async def close(self) -> None:
        """Nothing outlives a check; kept so the server's shutdown does not depend on that."""


def _advice(addr: str, error: str) -> str:
    port = addr.rsplit("/", 1)[-1]
    return (
        f"could not reach the peer at {addr} ({error}). Others cannot dial you directly: open TCP port "
        f"{port} in your firewall and forward it on your router to this machine, or announce the address "
        "others should dial (--announce-maddrs), or join through a relay"
    )
