"""Opening a route against full peers: no two clients ever wait for each other in a cycle.

Tier 1 (unit): `InferenceSession._open` against simulated peers that admit one session each and answer
an open the way peer.sessions does (at once if there is room, else after waiting the lesser of the
client's `wait_s` and the peer's admission time, PeerFull). The opens' timing is scripted so that each
of two clients gets one peer of the same two-peer route first: the interleaving that, when a client
waited for the full hop while holding the other, left both waiting until both were refused. The
real-process side (peers answering "full", many clients at once) is tests/test_overload.py.
"""

from __future__ import annotations

import asyncio
import contextvars
from types import SimpleNamespace

import pytest

from client.routing import Hop
from client.session import InferenceSession
from client.stream import SpanStream
from swarm.errors import PeerFull
from swarm.spans import Span

ADMISSION_S = 2.0
CLIENT = contextvars.ContextVar("client")  # which simulated client an open belongs to (tasks inherit it)


class Peer:
    """A peer with room for `room` sessions; opens wait as peer.sessions.SessionManager.open does."""

    def __init__(self, room: int = 1):
        self.room, self.holders = room, []

    async def admit(self, client: str, wait_s: float | None) -> None:
        wait_s = ADMISSION_S if wait_s is None else min(wait_s, ADMISSION_S)
        deadline = asyncio.get_running_loop().time() + wait_s
        while len(self.holders) >= self.room:
            if asyncio.get_running_loop().time() >= deadline:
                raise PeerFull(f"cache full (waited {wait_s:g} s)", peer="?")
            await asyncio.sleep(0.01)
        self.holders.append(client)


class FakeStream(SpanStream):
    def __init__(self, hop: Hop, peer: Peer, client: str):
        self.hop, self.peer, self.client = hop, peer, client

    async def close(self) -> None:
        if self.client in self.peer.holders:
            self.peer.holders.remove(self.client)


def client(name: str, peers: dict[str, Peer], delays: dict[str, float], log: list):
    """What `_open` needs of a session (its model, batch and length), opening as client `name`."""

    async def open_stream(transport, hop, addrs, model_id, batch, max_length, config, wait_s=None):
        await asyncio.sleep(delays.get(hop.peer_id, 0.0))
        log.append((name, hop.peer_id, wait_s))
        await peers[hop.peer_id].admit(name, wait_s)
        return FakeStream(hop, peers[hop.peer_id], name)

    async def transport():
        return None

    model = SimpleNamespace(model_id="m", client_config=SimpleNamespace(), transport=transport)
    session = SimpleNamespace(model=model, row_tokens=None, max_length=8)
    return session, open_stream


@pytest.mark.parametrize("first,second", [("peer-a", "peer-b"), ("peer-b", "peer-a")])
def test_two_clients_each_first_to_one_peer_both_get_the_route(monkeypatch, first, second):
    """Route [first 0:2, second 2:4]; client x reaches `first` first, client y reaches `second` first. The
    one holding the peer that sorts first keeps it and waits; the other lets its peer go and waits in
    order; x's route opens, and once x is done y's does: nobody is refused."""
    peers = {"peer-a": Peer(), "peer-b": Peer()}
    route = [Hop(first, Span(0, 2)), Hop(second, Span(2, 4))]
    log: list = []
    x, open_x = client("x", peers, {first: 0.0, second: 0.05}, log)
    y, open_y = client("y", peers, {first: 0.05, second: 0.0}, log)
    opens = {"x": open_x, "y": open_y}

    async def dispatch(transport, hop, *args, wait_s=None):
        return await opens[CLIENT.get()](transport, hop, *args, wait_s=wait_s)

    monkeypatch.setattr(SpanStream, "open", staticmethod(dispatch))

    async def main():
        async def run(session, name: str):
            CLIENT.set(name)
            return await InferenceSession._open(session, route, {})

        task_x = asyncio.create_task(run(x, "x"))
        task_y = asyncio.create_task(run(y, "y"))
        done, _ = await asyncio.wait([task_x, task_y], return_when=asyncio.FIRST_COMPLETED, timeout=ADMISSION_S * 3)
        assert done, f"neither client's route opened (the cycle of waits); opens: {log}"
        winner = done.pop()
        hops = winner.result()
        assert [h.peer_id for h in hops] == [first, second]  # in route order
        loser = task_y if winner is task_x else task_x
        assert not loser.done()
        for hop in hops:  # the winner's generation ends
            await hop.stream.close()
        other = await asyncio.wait_for(loser, ADMISSION_S * 3)
        assert [h.peer_id for h in other] == [first, second]
        for hop in other:
            await hop.stream.close()
        assert all(not p.holders for p in peers.values())

    asyncio.run(main())
    # both first asked every peer not to wait; only then did each wait, in the peers' id order
    assert [w for _, _, w in log[:4]] == [0.0] * 4
    waited = [(who, peer) for who, peer, w in log[4:] if w is None]
    for who in "xy":
        theirs = [peer for name, peer in waited if name == who]
        assert theirs == sorted(theirs), waited


def test_a_refusal_other_than_full_closes_what_was_opened(monkeypatch):
    peers = {"peer-a": Peer(), "peer-b": Peer()}
    route = [Hop("peer-a", Span(0, 2)), Hop("peer-b", Span(2, 4))]
    session, open_stream = client("x", peers, {}, [])

    async def failing(transport, hop, *args, wait_s=None):
        if hop.peer_id == "peer-b":
            raise ConnectionError("gone")
        return await open_stream(transport, hop, *args, wait_s=wait_s)

    monkeypatch.setattr(SpanStream, "open", staticmethod(failing))

    async def main():
        with pytest.raises(ConnectionError):
            await InferenceSession._open(session, route, {})
        await asyncio.sleep(0.05)  # the closes run as tasks
        assert not peers["peer-a"].holders

    asyncio.run(main())
