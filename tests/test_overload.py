"""Overload through real processes: many separate clients against KV budgets too small for all of them.

Tier 3 (fault scenarios): `swarm peer` processes with small `--cache-tokens`, 8 separate clients (each
its own p2pd) opening sessions at once. Admission counts each session's declared worst case, so every
client either generates exactly the local transformers tokens or is refused before its first token;
no session dies mid-generation for memory, no step waits without bound, and the peers are idle again as
soon as the clients have left. (The defect this guards: one page per session was admitted, all 8 grew
into a full budget and waited on each other until the client's step timeout, and the peer stayed
wedged until the idle expiry.)
"""

from __future__ import annotations

import time

import pytest

from client import ClientConfig, DistributedModelForCausalLM, loop
from client.launcher import LocalSwarm
from swarm.protocol import INFO_HANDLER
from overload import prompts, references, run_clients, summary

pytestmark = pytest.mark.slow
CLIENTS = 8
PROMPT_TOKENS = 128
NEW_TOKENS = 64  # max_length 192 = 12 pages of 16 tokens, as in the report


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path("llama", num_layers=4)


@pytest.fixture(scope="module")
def workload(model_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    asked = prompts(CLIENTS, PROMPT_TOKENS, vocab, seed=7)
    return asked, references(model_path, asked, NEW_TOKENS)


def peer_infos(model_path, swarm: LocalSwarm) -> list[dict]:
    observer = DistributedModelForCausalLM.from_pretrained(
        model_path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers)))

    async def ask(line: str) -> dict:
        peer_id = line.split("peer_id=")[1].split()[0]
        addrs = line.split("addrs=")[1].split()[0].split(",")
        transport = await observer.transport()
        return await transport.request(peer_id, addrs, INFO_HANDLER, {"type": "info"}, 10)

    try:
        return [loop.run(ask(proc.ready_line), 30) for proc in swarm.peers.values()]
    finally:
        observer.shutdown()


def assert_all_exact_or_refused(outcomes) -> dict:
    figures = summary(outcomes)
    assert figures["failed"] == figures["unrouted"] == 0, figures
    assert figures["completed"] >= 1 and figures["completed"] + figures["refused"] == CLIENTS, figures
    for outcome in outcomes:
        if outcome.status == "refused":
            assert "cache full" in outcome.error, outcome.error  # the peer's reason reaches the user
    return figures


def assert_idle(model_path, swarm: LocalSwarm, cache_tokens: int) -> None:
    deadline = time.monotonic() + 10  # the clients have closed their streams: nothing waits for expiry
    while True:
        infos = peer_infos(model_path, swarm)
        if all(i["active_sessions"] == 0 and i["cache_tokens_left"] == cache_tokens for i in infos):
            return
        assert time.monotonic() < deadline, [(i["active_sessions"], i["cache_tokens_left"]) for i in infos]
        time.sleep(0.5)


def test_eight_clients_against_a_budget_for_one(model_path, workload):
    """The report's case: one peer, --cache-tokens 256, each client declaring 192 tokens."""
    asked, expected = workload
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peer("0:4", extra=["--cache-tokens", "256", "--admission-timeout-s", "5"])
        outcomes = run_clients(model_path, swarm.initial_peers, asked, expected, NEW_TOKENS)
        figures = assert_all_exact_or_refused(outcomes)
        assert figures["moved"] == 0, figures
        assert_idle(model_path, swarm, 256)


def test_a_route_of_two_peers_with_room_for_a_quarter(model_path, workload):
    """Two peers of one route, each with room for 2 of the 8 sessions: same promise on every hop."""
    asked, expected = workload
    room = 2 * (PROMPT_TOKENS + NEW_TOKENS)
    with LocalSwarm(str(model_path)) as swarm:
        swarm.start_peers(["0:2", "2:4"], extra=["--cache-tokens", str(room), "--admission-timeout-s", "5"])
        outcomes = run_clients(model_path, swarm.initial_peers, asked, expected, NEW_TOKENS)
        assert_all_exact_or_refused(outcomes)
        assert_idle(model_path, swarm, room)
