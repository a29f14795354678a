"""Ask the swarm's health server whether others can dial this peer directly, and say what to do if not.

The health server connects back to the address the peer announces (GET /api/v1/reachability); the
answer is turned into one plain-words verdict line. Errors never stop the peer: the check is advice.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request


def check_url(health_url: str, peer_id: str, addr: str) -> str:
    query = urllib.parse.urlencode({"peer": peer_id, "addr": addr})
    return f"{health_url.rstrip('/')}/api/v1/reachability?{query}"


def _fetch(url: str, timeout_s: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) URL from the operator)
        return json.loads(response.read(64 * 1024))


def verdict(answer: dict, addr: str) -> str:
    """One line for the volunteer, from the health server's answer."""
    if answer.get("reachable") is True:
        return f"reachability: others can dial this peer directly at {addr}"
    detail = str(answer.get("detail", ""))[:200]
    return (
        f"reachability: others could NOT dial this peer at {addr} ({detail}); open the TCP port in your "
        "firewall/router and pass the public address with --announce-maddrs /ip4/<public ip>/tcp/<port>, "
        "or run behind a relay; until then only clients that can reach this address will use this peer"
    )


async def check(health_url: str, peer_id: str, addrs: list[str], timeout_s: float = 20.0) -> str:
    """The verdict for the first announced address (network errors become an 'unknown' line)."""
    addr = next((a for a in addrs if not a.startswith("/ip4/127.")), addrs[0] if addrs else "")
    url = check_url(health_url, peer_id, addr)
    try:
        answer = await asyncio.to_thread(_fetch, url, timeout_s)
    except (OSError, ValueError, urllib.error.URLError) as e:
        return f"reachability: unknown (the health server at {health_url} did not answer: {e})"
    return verdict(answer, addr)
