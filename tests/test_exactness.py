"""Exactness through real swarms: greedy (and seeded sampling) generation through peers equals local
transformers `generate`, token for token, for every family, two splits, batches and multi-turn sessions.

Tier 2: in-process peers with real p2pd daemons and DHT nodes, the real client library.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM

SPLIT_A = ["0:2", "2:5", "5:6"]
SPLIT_B = ["0:1", "1:3", "3:6"]
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
BATCH = torch.tensor([[0, 0, 0, 1, 71, 12, 400, 9], [1, 17, 230, 45, 99, 4, 310, 7], [0, 1, 5, 6, 80, 81, 82, 83]])
BATCH_MASK = (BATCH != 0).long()


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, inprocess_swarm, tiny_model_path):
    """(local model, client routed over split A, client routed over split B) for one family."""
    path = tiny_model_path(request.param)
    servers = inprocess_swarm.start_peers(path, SPLIT_A + SPLIT_B)
    ids_a = tuple(s.peer_id for s in servers[:3])
    ids_b = tuple(s.peer_id for s in servers[3:])
    clients = [
        DistributedModelForCausalLM.from_pretrained(
            path, client_config=ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), blocked_peers=blocked,
                                             min_precision="full")  # exactness: never a quantized span
        )
        for blocked in (ids_b, ids_a)
    ]
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        yield local, clients, (ids_a, ids_b)
    finally:
        for client in clients:
            client.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def greedy(model, ids, mask=None, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)


def test_single_prompt_both_splits_equal_local(family_swarm):
    local, clients, peer_sets = family_swarm
    expected = greedy(local, PROMPT, output_scores=True, return_dict_in_generate=True)
    for client in clients:
        got = greedy(client, PROMPT, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(got.sequences, expected.sequences)
        for ours, theirs in zip(got.scores, expected.scores, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_route_follows_the_split(family_swarm):
    _, clients, peer_sets = family_swarm
    for client, peers in zip(clients, peer_sets, strict=True):
        with client.inference_session(max_length=16) as session:
            client.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert [hop.peer_id for hop in session.route] == list(peers)


def test_left_padded_batch_equals_local(family_swarm):
    local, clients, _ = family_swarm
    expected = greedy(local, BATCH, BATCH_MASK)
    for client in clients:
        assert torch.equal(greedy(client, BATCH, BATCH_MASK), expected)


def test_multi_turn_session_equals_one_local_generation(family_swarm):
    local, clients, _ = family_swarm
    client = clients[0]
    second_turn = torch.tensor([[5, 6, 7]])
    with client.inference_session(max_length=64) as session:
        first = greedy(client, PROMPT)
        second = greedy(client, second_turn)
        assert session.position == PROMPT.shape[1] + 12 + second_turn.shape[1] + 12 - 1
    # second's sequence starts with the first turn's last token (returned, never fed) and the new turn
    assert torch.equal(second[:, :1], first[:, -1:])
    conversation = torch.cat([first, second_turn], dim=1)
    # explicit mask: a generated token may equal pad_token_id, and HF would infer it as padding
    expected = greedy(local, conversation, torch.ones_like(conversation))
    assert torch.equal(second[:, 1 + second_turn.shape[1] :], expected[:, conversation.shape[1] :])


def test_seeded_sampling_equals_local(family_swarm):
    local, clients, _ = family_swarm
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, pad_token_id=0)
    torch.manual_seed(1234)
    expected = local.generate(PROMPT, **kwargs)
    torch.manual_seed(1234)
    assert torch.equal(clients[1].generate(PROMPT, **kwargs), expected)
