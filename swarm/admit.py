"""Private swarms' proofs and refusals, without hivemind: the half of swarm.admission that swarm.direct
and the lite transport (swarm.lite) use. swarm.admission (which needs hivemind) re-exports all of it;
its docstring tells the whole scheme.
"""

from __future__ import annotations

import hashlib
import hmac

from swarm.errors import NotAdmitted
from swarm.protocol import PROTOCOL_MAJOR
from swarm.swarmkey import SwarmKey

ADMISSION_HANDLER = f"/swarm/v{PROTOCOL_MAJOR}/admission"  # "is this swarm private?" (any node that serves)
ERROR_PRIVATE = "private"  # the code of a refusal by a private swarm's member


# ---------------------------------------------------------------- what a refusal says


def refusal(who: str, their_key_id: object) -> str:
    """Why `who` (a member of a private swarm) refuses a dialer whose key id is `their_key_id`."""
    if not their_key_id:
        return (f"this swarm is private: {who} admits only peers and clients holding its swarm key; "
                "pass --swarm-key FILE (swarm_key= in Python) with the key file the swarm's owner gave you")
    return (f"this swarm is private and your swarm key (id {str(their_key_id)[:16]}) is not its key: {who} "
            "refused it; pass --swarm-key with this swarm's own key file")


def raise_refusal(reply: dict, what: str) -> None:
    """Raise NotAdmitted if `reply` is a private swarm's refusal (any message a gate may send)."""
    if reply.get("type") == "error" and reply.get("code") == ERROR_PRIVATE:
        raise NotAdmitted(f"{what} refused: {str(reply.get('message'))[:400]}")


# ---------------------------------------------------------------- stream admission


def proof(key: SwarmKey, dialer: str, listener: str, handler: str) -> bytes:
    text = f"{dialer}\x00{listener}\x00{handler}".encode()
    return hmac.new(key.derive("stream admission"), text, hashlib.sha256).digest()


def admit_fields(key: SwarmKey, dialer: str, listener: str, handler: str) -> dict:
    """What a dialer shows: {"key_id", "proof"} (in an admit message, or a direct hello's "admission")."""
    return {"key_id": key.key_id, "proof": proof(key, dialer, listener, handler)}


def check_admit(key: SwarmKey, fields: object, dialer: str, listener: str, handler: str) -> None:
    """Raise NotAdmitted (with the message the dialer will read) unless `fields` prove the dialer holds
    `key`, for this listener and handler."""
    fields = fields if isinstance(fields, dict) else {}
    key_id, shown = fields.get("key_id"), fields.get("proof")
    who = f"peer {listener[-8:]}"
    if type(key_id) is not str or type(shown) is not bytes:
        raise NotAdmitted(refusal(who, None))
    if not hmac.compare_digest(shown, proof(key, dialer, listener, handler)):
        if key_id == key.key_id:  # the right key, but not a proof for this dialer, listener and handler
            raise NotAdmitted(f"this swarm is private: {who} refused an admission proof made for another "
                              "peer or handler")
        raise NotAdmitted(refusal(who, key_id))

