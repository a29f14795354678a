"""Server-to-server steps: peers push each step's output straight to the next hop of the route.

Real in-process peers (p2pd, DHT, PeerServer) on a three-hop route; the client is the real
DistributedModelForCausalLM. Checks: tokens equal local transformers with pushing on and off, the
steps really travel peer to peer (the peers' counters), a next hop that cannot take pushes or loses
them falls back to the client path with the same tokens, and bad forwarded messages harm nothing.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, loop
from peer.forward import BATCH_BYTES, ForwardLink, _batches
from swarm.protocol import FORWARD_HANDLER, PROTOCOL_MINOR, pack_tensor, push_token, write_message

MODEL_ID = "forward-llama"
SPANS = ["0:2", "2:4", "4:6"]
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    with inprocess_swarm.serving(tiny_model_path("llama"), SPANS, MODEL_ID, PROMPT, NEW_TOKENS) as (
        servers, expected, client
    ):
        yield inprocess_swarm, servers, expected, client


class AtToken(BaseStreamer):
    """Runs `action` when generate emits its token number `at` (1 = the first new token)."""

    def __init__(self, at: int, action):
        self.at, self.action, self.calls = at, action, 0

    def put(self, value):
        self.calls += 1
        if self.calls - 1 == self.at:
            self.action()

    def end(self):
        pass


def generate(model, servers, streamer=None) -> torch.Tensor:
    """Greedy tokens through the three-hop route (checked to be exactly `servers`, with no recovery)."""
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, streamer=streamer)
        assert [h.peer_id for h in session.hops] == [s.peer_id for s in servers], "route changed"
        assert session.recoveries == 0
    return out


def counts(servers) -> list[dict]:
    return [dict(vars(s.forward_stats)) for s in servers]


def reopen_pushes(servers) -> None:
    """Close the peers' push streams (they are shared and kept across sessions), so that the next push
    opens a new one, which meets the next peer's forward handler as it is now."""
    for server in servers:
        server.channels.close()


def delta(before: list[dict], after: list[dict]) -> list[dict]:
    return [{k: a[k] - b[k] for k in a} for b, a in zip(before, after, strict=True)]


def test_a_cohorts_pushes_are_cut_into_bounded_batches_in_order():
    steps = [{"i": i, "hidden": {"data": b"x" * size}} for i, size in enumerate([300_000] * 7 + [8192] * 3)]
    batches = _batches(steps)
    assert [s["i"] for batch in batches for s in batch] == list(range(10))
    assert [len(b) for b in batches] == [3, 3, 4]
    assert all(sum(len(s["hidden"]["data"]) for s in batch) <= BATCH_BYTES for batch in batches)
    assert _batches(steps[:1]) == [steps[:1]]


def test_steps_travel_peer_to_peer_with_local_tokens(env):
    swarm, servers, expected, client = env
    model = client()
    before = counts(servers)
    assert torch.equal(generate(model, servers), expected)
    steps = NEW_TOKENS  # the prompt's step and NEW_TOKENS - 1 decode steps
    first, middle, last = delta(before, counts(servers))
    assert first["pushed"] == steps and first["received"] == 0, first
    assert middle["received"] == steps and middle["pushed"] == steps, middle
    assert last["received"] == steps and last["pushed"] == 0, last
    assert all(d["push_failed"] == 0 and d["duplicates"] == 0 for d in (first, middle, last))


def test_pushing_off_sends_every_hop_from_the_client(env):
    swarm, servers, expected, client = env
    model = client(server_to_server=False)
    before = counts(servers)
    assert torch.equal(generate(model, servers), expected)
    assert all(d == {k: 0 for k in d} for d in delta(before, counts(servers)))


def test_next_hop_without_forwarding_falls_back_to_the_client(env):
    """The last peer stops taking forwarded steps: the middle peer's pushes fail, it says so in its
    result, and the client sends the last hop each step itself."""
    swarm, servers, expected, client = env
    model = client()
    last = servers[2]
    swarm._run(last.p2p.remove_binary_stream_handler(FORWARD_HANDLER))
    direct_handler = last.direct.handlers.pop(FORWARD_HANDLER)  # on both paths: direct, then p2pd
    reopen_pushes(servers)
    try:
        before = counts(servers)
        assert torch.equal(generate(model, servers), expected)
        first, middle, end = delta(before, counts(servers))
    finally:
        swarm._run(last.p2p.add_binary_stream_handler(FORWARD_HANDLER, last._handle_forward))
        last.direct.handlers[FORWARD_HANDLER] = direct_handler
        reopen_pushes(servers)
    assert middle["received"] == NEW_TOKENS and middle["push_failed"] == NEW_TOKENS, middle
    assert end["received"] == 0, end


def test_lost_pushes_fall_back_after_the_forward_wait(env, monkeypatch):
    """The middle peer swallows forwarded steps (a push that says it was made but never arrives): the
    client waits forward_wait_s, sends the step itself, and the tokens are the same."""
    swarm, servers, expected, client = env
    model = client(forward_wait_s=0.2)
    middle = servers[1]

    async def swallow(stream_info, reader, writer):
        while await reader.read(1 << 16):
            pass

    swarm._run(middle.p2p.remove_binary_stream_handler(FORWARD_HANDLER))
    swarm._run(middle.p2p.add_binary_stream_handler(FORWARD_HANDLER, swallow))
    middle.direct.handlers[FORWARD_HANDLER] = swallow
    reopen_pushes(servers)
    try:
        before = counts(servers)
        assert torch.equal(generate(model, servers), expected)
        first, mid, last = delta(before, counts(servers))
    finally:
        swarm._run(middle.p2p.remove_binary_stream_handler(FORWARD_HANDLER))
        swarm._run(middle.p2p.add_binary_stream_handler(FORWARD_HANDLER, middle._handle_forward))
        middle.direct.handlers[FORWARD_HANDLER] = middle._handle_forward
        reopen_pushes(servers)
    assert first["pushed"] == NEW_TOKENS and mid["received"] == 0, (first, mid)
    assert last["received"] > 0, last  # the middle peer still pushes what the client sent it (a slow push: a fallback)


def test_bad_forwarded_messages_harm_nothing(env):
    """Sent mid-generation to the middle peer, alone and batched: an unknown session, a wrong token, the
    real pusher's token from another peer, a non-ASCII token, a valid token at a position the session is
    not at, garbage, malformed batches. All dropped; the peer and the session go on with the same tokens."""
    swarm, servers, expected, client = env
    model = client()
    target = servers[1]
    hidden_size = target.model_config.hidden_size
    transport = loop.run(model.transport())
    me = transport.p2p.peer_id.to_base58()

    async def send_junk():
        reader, writer = await transport.open_stream(target.peer_id, target.addrs, FORWARD_HANDLER, 10)
        session = next(iter(target.sessions._sessions.values()))
        at, key, sid = session.position, session.push_key, session.session_id
        step = {
            "type": "step", "minor": PROTOCOL_MINOR, "step": 0, "position": at,
            "hidden": pack_tensor(torch.randn(1, 1, hidden_size)),
            "position_ids": pack_tensor(torch.tensor([[at]])), "valid": pack_tensor(torch.ones(1, 1, dtype=torch.bool)),
        }
        rejected = [
            {"session": 10**9, "token": push_token(key, me, at)},  # no such session
            {"session": sid, "token": "0" * 32},  # wrong token
            {"session": sid, "token": push_token(key, servers[0].peer_id, at)},  # the real pusher's, not ours
            {"session": sid, "token": "é" * 32},  # not even ASCII
        ]
        await write_message(writer, {"type": "steps", "minor": PROTOCOL_MINOR,  # the same, batched
                                     "steps": [{**step, **fields} for fields in rejected]})
        for fields in [*rejected, {"session": sid, "token": push_token(key, me, at + 5), "position": at + 5}]:
            await write_message(writer, {**step, **fields})  # the last: a token made for where it is not
        writer.write(b"\x00\x00\x00\x05junk!")  # not msgpack: the stream is dropped
        await writer.drain()
        for junk in ({"type": "steps", "steps": "not a list"}, {"type": "steps", "steps": [step, 7]}):
            reader, writer = await transport.open_stream(target.peer_id, target.addrs, FORWARD_HANDLER, 10)
            await write_message(writer, junk)  # a malformed batch drops the stream, and none of its steps runs
            await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()

    before = counts(servers)
    out = generate(model, servers, AtToken(3, lambda: loop.run(send_junk(), 30)))
    assert torch.equal(out, expected)
    middle = delta(before, counts(servers))[1]
    assert middle["rejected"] == 8 and middle["duplicates"] == 1, middle  # the token made for position + 5 got in


def test_push_reported_failed_but_delivered(env, monkeypatch):
    """A push whose write timed out may still arrive: the client's own copy of the step is a fallback,
    which the next peer drops once the forwarded copy ran; no extra reply, no failover, same tokens."""
    swarm, servers, expected, client = env
    model = client()
    send = ForwardLink.send

    async def delivered_but_reported_failed(link, *args, **kwargs):
        await send(link, *args, **kwargs)
        await asyncio.sleep(0.05)  # the forwarded copy runs first
        return False

    monkeypatch.setattr(ForwardLink, "send", delivered_but_reported_failed)
    before = counts(servers)
    assert torch.equal(generate(model, servers), expected)  # no recovery either (checked there)
    first, middle, last = delta(before, counts(servers))
    for hop in (middle, last):  # one copy of every step ran, the other was dropped (the last step's second
        # copy may still be on its way when the session closes)
        assert NEW_TOKENS - 1 <= hop["duplicates"] <= NEW_TOKENS and hop["received"] > 0, hop


def test_pushes_travel_in_the_next_peers_dtype(inprocess_swarm, tiny_model_path):
    """float32 -> bfloat16 -> float32 peers: every push is cast to the receiver's wire dtype, and the
    tokens equal the client path's (which casts the same way on the client)."""
    path = tiny_model_path("llama")
    servers = [inprocess_swarm.start_peers(path, [span], model_id="forward-mixed", dtype=dtype)[0]
               for span, dtype in (("0:2", "float32"), ("2:4", "bfloat16"), ("4:6", "float32"))]
    clients = []
    try:
        outs = {}
        for server_to_server in (True, False):
            config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id="forward-mixed",
                                  step_timeout_s=10, server_to_server=server_to_server)
            clients.append(DistributedModelForCausalLM.from_pretrained(path, client_config=config))
            before = counts(servers)
            outs[server_to_server] = generate(clients[-1], servers)
            received = [d["received"] for d in delta(before, counts(servers))]
            assert received == ([0, NEW_TOKENS, NEW_TOKENS] if server_to_server else [0, 0, 0]), received
        assert torch.equal(outs[True], outs[False])
    finally:
        for c in clients:
            c.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)
