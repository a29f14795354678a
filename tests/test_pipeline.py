"""A long step (a prompt) through several hops as a pipeline of parts (ClientConfig.pipeline_chunk_tokens).

Real in-process peers (p2pd, DHT, PeerServer), two for each of three spans; the client is the real
DistributedModelForCausalLM. Checks: tokens equal local transformers at every part size (dividing the
prompt or not, one token, pushes off, checks on every step), the parts really travel peer to peer, and a
hop whose stream breaks in the middle of the prompt (first, middle or last hop) is replaced with the same
tokens.
"""

from __future__ import annotations

import pytest
import torch

MODEL_ID = "pipeline-llama"
SPANS = ["0:2", "2:4", "4:6", "0:2", "2:4", "4:6"]
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7, 21, 88, 130, 5, 61, 250, 9, 14, 333, 2, 76, 40]])
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    with inprocess_swarm.serving(tiny_model_path("llama"), SPANS, MODEL_ID, PROMPT, NEW_TOKENS) as (
        servers, expected, client
    ):
        yield servers, expected, client


def generate(model):
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return out, [h.peer_id for h in session.hops], session.recoveries


def pushed(servers) -> dict[str, int]:
    return {s.peer_id: s.forward_stats.pushed for s in servers}


@pytest.mark.parametrize("chunk", [1, 3, 7, 19, 20, 0])
def test_a_prompt_in_parts_gives_local_tokens_at_any_part_size(env, chunk):
    servers, expected, client = env
    model = client(pipeline_chunk_tokens=chunk)
    before = pushed(servers)
    out, route, recoveries = generate(model)
    assert torch.equal(out, expected)
    assert recoveries == 0 and len(route) == 3
    parts = -(-PROMPT.shape[1] // chunk) if 0 < chunk < PROMPT.shape[1] else 1
    after = pushed(servers)
    # every part, then every decode step, pushed on by the first two hops
    assert [after[p] - before[p] for p in route] == [parts + NEW_TOKENS - 1] * 2 + [0]
    assert all(s.forward_stats.duplicates == 0 for s in servers)


@pytest.mark.parametrize("fields", [{"server_to_server": False}, {"verify_probability": 1.0, "verify_seed": 3}])
def test_parts_without_pushes_or_with_every_step_checked(env, fields):
    servers, expected, client = env
    out, _, recoveries = generate(client(pipeline_chunk_tokens=3, **fields))
    assert torch.equal(out, expected) and recoveries == 0


@pytest.mark.parametrize("hop", [0, 1, 2])
def test_a_hop_failing_in_the_middle_of_the_prompt_is_replaced_with_the_same_tokens(env, hop, monkeypatch):
    """The route's hop `hop` breaks its client stream while it runs the third part of the prompt: the
    client routes its blocks to the other peer, feeds it the parts before, and goes on."""
    servers, expected, client = env
    model = client(pipeline_chunk_tokens=3)
    route = generate(model)[1]  # the route this client's planning picks (the same again: nothing changed)
    victim = next(s for s in servers if s.peer_id == route[hop])
    calls = {"n": 0}
    original = victim._run_step

    async def breaking(session, request, cohort_end):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionResetError("injected: the stream broke mid-prompt")
        return await original(session, request, cohort_end)

    monkeypatch.setattr(victim, "_run_step", breaking)
    out, new_route, recoveries = generate(model)
    assert torch.equal(out, expected)
    assert recoveries >= 1 and victim.peer_id not in new_route, (route, new_route)
