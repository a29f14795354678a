"""The exception hierarchy shared by every role.

    SwarmError
    ├── ConfigError            bad local input (a path, a flag, a span); fix the command line
    ├── ProtocolError          a message from the network failed the strict decoder
    │   └── VersionMismatch    the other side speaks another protocol version
    ├── PeerError              a peer answered with an error, or did not answer in time
    │   └── PeerRefused        the peer refused the request on purpose (limits, draining, unknown blocks)
    │       └── NotAdmitted    a private swarm refused us: we hold no swarm key, or another one
    ├── RoutingError           no chain of peers covers the model's blocks
    │   └── MissingBlocksError
    └── SessionError           an inference session cannot go on (length exceeded, closed)

Every error carries the context needed to act on it (peer, blocks, session) in its message.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(SwarmError):
    """Local configuration or input is invalid; the message says which and how to fix it."""


class ProtocolError(SwarmError):
    """A message from the network failed validation; the message names the offending field."""


class VersionMismatch(ProtocolError):
    """The remote side speaks a protocol version we do not."""


class PeerError(SwarmError):
    """A remote peer failed, answered an error, or timed out."""

    def __init__(self, message: str, *, peer: str | None = None):
        super().__init__(f"{message} (peer {peer})" if peer else message)
        self.peer = peer


class PeerRefused(PeerError):
    """The peer refused the request on purpose; retrying the same peer with the same request will not help."""


class PeerFull(PeerRefused):
    """The peer's KV budget is committed to other sessions right now (error code "full"): it may take the
    session once some close, unlike other refusals."""


class NotAdmitted(PeerRefused):
    """A member of a private swarm refused us (swarm.admission): we hold no swarm key, or another one;
    or we hold a key and the node we asked is no member of that private swarm. Fix: --swarm-key FILE."""


class RoutingError(SwarmError):
    """No usable route through the swarm."""


class MissingBlocksError(RoutingError):
    """Some blocks of the model are served by no reachable peer."""

    def __init__(self, model_id: str, missing: list[int], detail: str = ""):
        """`detail`: why usable peers are missing where some peer does serve the blocks (e.g. only below the
        precision the client asked for), with what to do; replaces the default advice."""
        self.model_id = model_id
        self.missing = list(missing)
        advice = detail or "start a peer for them (swarm peer --blocks ...) or wait longer (wait_for_route_s)"
        super().__init__(f"model {model_id!r}: no peer serves blocks {format_blocks(self.missing)}; {advice}")


class SessionError(SwarmError):
    """An inference session cannot continue as asked."""


def format_blocks(blocks: list[int]) -> str:
    """Compact form of a block list: [0, 1, 2, 5] -> '0:3, 5'."""
    out: list[str] = []
    blocks = sorted(set(blocks))
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(str(blocks[i]) if i == j else f"{blocks[i]}:{blocks[j] + 1}")
        i = j + 1
    return ", ".join(out)
