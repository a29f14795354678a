"""local_blocks: the client runs the first and last blocks itself, so no peer sees the embeddings' output
or the final hidden states; generation stays exactly local transformers' (real in-process peers)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM
from swarm.errors import ConfigError

MODEL_ID = "local-blocks-llama"
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])


@pytest.fixture(scope="module")
def swarm_and_reference(inprocess_swarm, tiny_model_path):
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, ["0:3", "3:6"], model_id=MODEL_ID)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        yield path, servers, local
    finally:
        for server in servers:
            inprocess_swarm.stop_peer(server)


@pytest.mark.parametrize("local_blocks", [(1, 1), (2, 1), (0, 2)])
def test_local_blocks_are_exact_and_never_reach_a_peer(inprocess_swarm, swarm_and_reference, local_blocks):
    path, servers, local = swarm_and_reference
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=MODEL_ID)
    model = DistributedModelForCausalLM.from_pretrained(path, client_config=config, local_blocks=local_blocks)
    first, last = local_blocks
    try:
        expected = local.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
                                  return_dict_in_generate=True)
        with model.inference_session(max_length=40) as session:
            got = model.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
            route = [hop.span for hop in session.route]
            # a second turn continues from every cache, the local ones included
            turn = torch.tensor([[5, 6, 7]])
            second = model.generate(turn, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.scores, expected.scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert route[0].start == first and route[-1].end == 6 - last  # peers hold only the blocks between
        conversation = torch.cat([expected.sequences, turn], dim=1)
        reference = local.generate(conversation, attention_mask=torch.ones_like(conversation), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        assert torch.equal(second[:, -4:], reference[:, -4:])
    finally:
        model.shutdown()


def test_local_blocks_must_leave_blocks_to_the_swarm(swarm_and_reference):
    path = swarm_and_reference[0]
    for bad in [(3, 3), (6, 0), (-1, 1)]:
        with pytest.raises(ConfigError, match="local_blocks"):
            DistributedModelForCausalLM.from_pretrained(path, local_blocks=bad)
