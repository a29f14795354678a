"""Rollback of a session to an earlier position (protocol minor 3), through real in-process peers.

A client that fed tokens it then takes back (speculative decoding's rejected drafts) rolls every span
back; what it generates next equals local transformers as if those tokens had never been fed, also when
a peer of the route is gone after the rollback (the replacement replays only the kept inputs up to the
rollback point). Bad rollbacks get a clear, non-fatal error and leave the session as it was.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM, loop
from swarm.protocol import INFERENCE_HANDLER, PROTOCOL_MINOR, pack_tensor, read_message, write_message

MODEL_ID = "rollback-llama"
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
JUNK = torch.tensor([[300, 301, 302, 303, 304]])
HIDDEN = 64


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, ["0:3", "3:6", "0:3", "3:6"], model_id=MODEL_ID)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = local.generate(PROMPT, max_new_tokens=10, do_sample=False, pad_token_id=0)
    try:
        yield path, servers, expected
    finally:
        for server in servers:
            if server in inprocess_swarm.servers:
                inprocess_swarm.stop_peer(server)


def client_for(inprocess_swarm, path, **fields):
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=MODEL_ID, step_timeout_s=10,
                          **fields)
    return DistributedModelForCausalLM.from_pretrained(path, client_config=config)


def feed_junk(model, session) -> int:
    """Feed JUNK through the route (what a rejected draft is) and return the position before it."""
    before = session.position
    with torch.inference_mode():
        session.step(model.embed_tokens(JUNK), torch.ones(JUNK.shape, dtype=torch.bool))
    assert session.position == before + JUNK.shape[1]
    return before


@pytest.mark.parametrize("server_to_server", [True, False])
def test_rollback_then_generate_equals_local(inprocess_swarm, env, server_to_server):
    path, _, expected = env
    model = client_for(inprocess_swarm, path, server_to_server=server_to_server)
    try:
        with model.inference_session(max_length=40) as session:
            first = model.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(first, expected[:, :12])
            # the last token (returned, not fed) is pending; junk then goes in after the fed prefix
            session.rollback(feed_junk(model, session))
            session.rollback(feed_junk(model, session) + 2)  # a partial rollback keeps two junk tokens ...
            session.rollback(session.position - 2)  # ... then drops them too
            rest = model.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
        assert torch.equal(rest[:, 1:], expected[:, 12:])
    finally:
        model.shutdown()


def test_failover_after_rollback_replays_only_the_kept_prefix(inprocess_swarm, env):
    path, servers, expected = env
    model = client_for(inprocess_swarm, path)
    try:
        with model.inference_session(max_length=40) as session:
            model.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
            session.rollback(feed_junk(model, session) + 3)
            session.rollback(session.position - 3)
            victim = next(s for s in servers if s.peer_id == session.route[1].peer_id)
            inprocess_swarm.stop_peer(victim)  # its replacement is rebuilt from the kept inputs
            rest = model.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
            assert session.recoveries == 1 and victim.peer_id not in {h.peer_id for h in session.route}
        assert torch.equal(rest[:, 1:], expected[:, 12:])
    finally:
        model.shutdown()


def step_message(at: int, step: int, tokens: int = 1) -> dict:
    return {
        "type": "step", "minor": PROTOCOL_MINOR, "step": step, "position": at,
        "hidden": pack_tensor(torch.randn(1, tokens, HIDDEN)),
        "position_ids": pack_tensor(torch.arange(at, at + tokens)[None]),
        "valid": pack_tensor(torch.ones(1, tokens, dtype=torch.bool)),
    }


def test_bad_rollbacks_are_refused_and_change_nothing(inprocess_swarm, env):
    path, servers, _ = env
    server = next(s for s in servers if s in inprocess_swarm.servers and s.span.start == 0)
    model = client_for(inprocess_swarm, path)

    async def talk():
        transport = await model.transport()
        reader, writer = await transport.open_stream(server.peer_id, server.addrs, INFERENCE_HANDLER, 10)

        async def ask(message):
            await write_message(writer, message)
            return await asyncio.wait_for(read_message(reader, 1 << 20), 10)

        try:
            opened = await ask({"type": "open", "minor": PROTOCOL_MINOR, "model_id": MODEL_ID, "blocks": [0, 3],
                                "batch_size": 1, "max_length": 16})
            assert opened["type"] == "opened" and opened["minor"] >= 3
            assert (await ask(step_message(0, 0, tokens=6)))["position"] == 6
            replies = {}
            for bad in (7, -1, "3", 2.0, None, True):
                replies[repr(bad)] = await ask({"type": "rollback", "minor": PROTOCOL_MINOR, "position": bad})
            ok = await ask({"type": "rollback", "minor": PROTOCOL_MINOR, "position": 4})
            same = await ask({"type": "rollback", "minor": PROTOCOL_MINOR, "position": 4})
            after = await ask(step_message(4, 1, tokens=2))  # the session holds 4: a step at 4 runs
            stale = await ask(step_message(5, 2))  # ... and one at the old position does not
            return replies, ok, same, after, stale
        finally:
            writer.close()

    try:
        replies, ok, same, after, stale = loop.run(talk(), 60)
    finally:
        model.shutdown()
    for bad, reply in replies.items():
        assert reply["type"] == "error" and reply["code"] == "protocol" and not reply["fatal"], (bad, reply)
        assert "position" in reply["message"], reply
    assert "holds 6 tokens" in replies["7"]["message"] and "[0, 6]" in replies["-1"]["message"]
    assert ok == {"type": "rolled_back", "position": 4} and same == ok
    assert after["type"] == "result" and after["position"] == 6
    assert stale["type"] == "error" and "holds 6 tokens" in stale["message"]
