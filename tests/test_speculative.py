"""Speculative decoding over the swarm (client.speculative): the same tokens as plain decoding.

Through real in-process peers, for every tiny family: greedy and seeded sampling with n-gram drafts
(prompt lookup) and with a draft model, on repetitive prompts (drafts get accepted) and random ones,
a left-padded batch whose rows finish at different times, a two-turn session, and a failover in the
middle of a speculative step. The draft sources and the adaptive draft length are checked on their own
first (plain functions).

Why picking the repetitive prompt by simulation is sound: a round drafts at the first position not
decided yet, so if the expected output has a position (not the last) whose token the draft source
proposes from the tokens before it, that position either starts a round whose first draft stands, or
lies after a draft that stood. Either way the run accepts a draft, provided it is exact.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM
from client.session import InferenceSession
from client.speculative import DraftLength, Speculative, ngram_draft
from client.stream import SpanStream
from swarm.errors import ConfigError

SPANS = ["0:3", "3:6"]
NEW = 12
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
SAMPLING = dict(max_new_tokens=NEW, do_sample=True, temperature=0.5, top_k=20, pad_token_id=0)
SEED = 5
# repetitive prompts (one token, or a short cycle, repeated); each family's tiny model continues some of
# them with tokens it has seen, which the test picks by simulation (module docstring)
REPETITIVE = [[t] * 16 for t in (231, 137, 262, 70, 215, 491)] + [[176, 141] * 8]
RANDOM = torch.randint(4, 500, (1, 14), generator=torch.Generator().manual_seed(11))


# ---------------------------------------------------------------- draft sources and draft length


def test_ngram_draft_continues_the_latest_occurrence():
    assert ngram_draft([5, 6, 7, 8, 5, 6], 2) == [7, 8]
    assert ngram_draft([1, 2, 3, 9, 2, 3, 4, 2, 3], 1) == [4]  # the latest occurrence of (2, 3)
    assert ngram_draft([1, 2, 3, 1, 2, 3, 1], 7) == [2, 3, 1, 2, 3, 1, 2]  # a cycle drafts whole periods
    assert ngram_draft([1, 2, 3, 4], 3) == []  # nothing repeats
    assert ngram_draft([4, 1, 4, 2, 9, 2], 1, max_ngram=3, min_ngram=2) == []  # only unigrams match
    assert ngram_draft([7], 3) == [] and ngram_draft([], 3) == []


def test_draft_length_adapts_to_the_acceptance_rate():
    length = DraftLength(max_tokens=8, min_tokens=1)
    start = length.k
    for _ in range(10):
        length.update(length.k, 0)  # every draft missed
    assert length.k == 1 < start
    for _ in range(10):
        length.update(length.k, length.k)  # every draft stood
    assert length.k == 8
    length.update(0, 0)  # a round without drafts says nothing
    assert length.k == 8


def test_speculative_arguments_map_and_bad_ones_are_refused():
    assert Speculative.of() is None and Speculative.of(False) is None
    assert Speculative.of(True).draft_model is None and Speculative.of("ngram").max_draft_tokens == 8
    assert Speculative.of(5).max_draft_tokens == 5
    assert Speculative.of(prompt_lookup_num_tokens=3).max_draft_tokens == 3
    marker = object()
    assert Speculative.of(assistant_model=marker).draft_model is marker
    for bad in ("yes", 0, 65, 2.0):
        with pytest.raises(ConfigError):
            Speculative.of(bad)
    with pytest.raises(ConfigError):
        Speculative(max_ngram=0)
    with pytest.raises(ConfigError):
        Speculative(extra_token_cost=float("nan"))


def test_model_drafter_drafts_the_draft_models_greedy_tokens(tiny_model_path):
    """Across calls whose tokens share a prefix, diverge and grow, the cached drafter proposes exactly what
    the draft model's own greedy decoding gives from scratch."""
    draft = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen3")).eval()
    drafter = Speculative(draft_model=draft).drafter()

    def greedy_from_scratch(tokens, k):
        out = draft.generate(torch.tensor([tokens]), max_new_tokens=k, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        return out[0, len(tokens):].tolist()

    tokens = [1, 17, 230, 45, 99]
    for step in ([], [4, 310], [7], [12, 13, 14]):  # grow past the drafts, then diverge from them
        tokens = tokens + step
        assert drafter.draft(tokens, 4) == greedy_from_scratch(tokens, 4)
    tokens = tokens[:3] + [88]  # a shorter, different prefix: the cache is cut back
    assert drafter.draft(tokens, 3) == greedy_from_scratch(tokens, 3)


# ---------------------------------------------------------------- through the swarm


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    """Per family: (local model, client) over one 2-peer route; all families' peers share one swarm."""
    paths = {family: tiny_model_path(family) for family in FAMILIES}
    servers = []
    for family, path in paths.items():
        servers += inprocess_swarm.start_peers(path, SPANS, model_id=f"spec-{family}")
    clients = {}
    try:
        for family, path in paths.items():
            config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers),
                                  model_id=f"spec-{family}", step_timeout_s=10)
            clients[family] = (AutoModelForCausalLM.from_pretrained(path).eval(),
                               DistributedModelForCausalLM.from_pretrained(path, client_config=config))
        yield clients
    finally:
        for _, client in clients.values():
            client.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def draft_outcomes(tokens: list[int], start: int, propose) -> tuple[int, int]:
    """(hits, misses): positions in [start, len - 1) whose token `propose(prefix)` drafts, and those where it
    drafts another token (the last position never drafts)."""
    hits = misses = 0
    for i in range(start, len(tokens) - 1):
        draft = propose(tokens[:i])
        hits += draft == tokens[i]
        misses += draft is not None and draft != tokens[i]
    return hits, misses


def ngram_first(prefix: list[int]) -> int | None:
    draft = ngram_draft(prefix, 1)
    return draft[0] if draft else None


def local_generate(local, prompt, kwargs, seed=None, mask=None):
    if seed is not None:
        torch.manual_seed(seed)
    return local.generate(prompt, attention_mask=mask, **kwargs)


def repetitive(local, kwargs, propose=ngram_first, seed=None):
    """The repetitive prompt whose expected output has drafts both standing and missing (most of both, then
    most hits), and that output: misses before the end make an exactness bug show in the tokens."""
    best = None
    for tokens in REPETITIVE:
        prompt = torch.tensor([tokens])
        expected = local_generate(local, prompt, kwargs, seed)
        hits, misses = draft_outcomes(expected[0].tolist(), prompt.shape[1], propose)
        if best is None or (min(hits, misses), hits) > best[0]:
            best = ((min(hits, misses), hits), prompt, expected)
    (_, hits), prompt, expected = best
    assert hits > 0, "no repetitive prompt gets a draft accepted: extend REPETITIVE"
    return prompt, expected


def speculative_generate(client, prompt, kwargs, seed=None, mask=None, **spec):
    if seed is not None:
        torch.manual_seed(seed)
    speculative = spec.pop("speculative", True)
    out = client.generate(prompt, attention_mask=mask, speculative=speculative, **spec, **kwargs)
    return out, client.last_speculation


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_plain_and_local(env, family):
    local, client = env[family]
    prompt, expected = repetitive(local, GREEDY)
    got, stats = speculative_generate(client, prompt, GREEDY)
    assert torch.equal(got, expected)
    assert 0 < stats.accepted < stats.drafted and stats.rounds < NEW and stats.tokens == NEW
    assert torch.equal(client.generate(prompt, **GREEDY), expected)  # plain decoding through the swarm too
    # scores (and raw logits) as `_sample` returns them: one [batch, vocab] per new token, the same values
    scored = dict(GREEDY, output_scores=True, output_logits=True, return_dict_in_generate=True)
    theirs = local.generate(prompt, **scored)
    ours = client.generate(prompt, speculative=True, **scored)
    assert torch.equal(ours.sequences, expected) and len(ours.scores) == len(ours.logits) == NEW
    for mine, reference in zip(ours.scores + ours.logits, theirs.scores + theirs.logits, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0)
    got, stats = speculative_generate(client, RANDOM, GREEDY)
    assert torch.equal(got, local_generate(local, RANDOM, GREEDY))
    assert stats.tokens == NEW


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_equals_plain_sampling(env, family):
    local, client = env[family]
    prompt, expected = repetitive(local, SAMPLING, seed=SEED)
    got, stats = speculative_generate(client, prompt, SAMPLING, seed=SEED)
    assert torch.equal(got, expected)
    assert stats.accepted > 0
    got, _ = speculative_generate(client, RANDOM, SAMPLING, seed=SEED)
    assert torch.equal(got, local_generate(local, RANDOM, SAMPLING, seed=SEED))


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_model_greedy_and_sampling(env, family, tiny_model_path):
    """A draft model (the family's own checkpoint cut to 4 of its 6 layers: same vocabulary, often right,
    sometimes wrong), through HF's `assistant_model=` argument."""
    local, client = env[family]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # loading fewer layers than stored is what we ask for
    try:
        draft = AutoModelForCausalLM.from_pretrained(tiny_model_path(family), num_hidden_layers=4).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)

    def propose(prefix):
        return int(draft(torch.tensor([prefix])).logits[0, -1].argmax())

    prompt, expected = repetitive(local, GREEDY, propose)
    got, stats = speculative_generate(client, prompt, GREEDY, speculative=None, assistant_model=draft)
    assert torch.equal(got, expected)
    assert stats.accepted > 0 and stats.rounds < NEW
    got, stats = speculative_generate(client, RANDOM, SAMPLING, seed=SEED, speculative=None,
                                      assistant_model=draft)
    assert torch.equal(got, local_generate(local, RANDOM, SAMPLING, seed=SEED))
    assert stats.drafted > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_whose_rows_finish_apart(env, family):
    """Left-padded rows, one finishing early at an EOS (then padding) while the other goes on."""
    local, client = env[family]
    prompt, alone = repetitive(local, GREEDY)
    other = RANDOM[:, : prompt.shape[1] - 4]
    batch = torch.cat([prompt, torch.cat([torch.zeros(1, 4, dtype=torch.long), other], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    eos = int(alone[0, prompt.shape[1] + 3])  # the repetitive row stops at its 4th token (or earlier)
    kwargs = dict(GREEDY, eos_token_id=eos)
    expected = local_generate(local, batch, kwargs, mask=mask)
    assert expected[0, -1] == 0  # the repetitive row finished (then padding)
    got, stats = speculative_generate(client, batch, kwargs, mask=mask)
    assert torch.equal(got, expected)
    expected = local_generate(local, batch, dict(SAMPLING, eos_token_id=eos), seed=SEED, mask=mask)
    got, _ = speculative_generate(client, batch, dict(SAMPLING, eos_token_id=eos), seed=SEED, mask=mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turn_session(env, family):
    local, client = env[family]
    prompt, _ = repetitive(local, GREEDY)
    second_turn = torch.tensor([[5, 6, 7]])
    with client.inference_session(max_length=64) as session:
        first, _ = speculative_generate(client, prompt, GREEDY)
        second, _ = speculative_generate(client, second_turn, GREEDY)
        # every token but the last one returned is fed, as with plain decoding
        assert session.position == prompt.shape[1] + NEW + second_turn.shape[1] + NEW - 1
    conversation = torch.cat([first, second_turn], dim=1)
    expected = local_generate(local, conversation, GREEDY, mask=torch.ones_like(conversation))
    assert torch.equal(second[:, 1 + second_turn.shape[1] :], expected[:, conversation.shape[1] :])


@pytest.mark.slow
def test_failover_in_the_middle_of_a_speculative_step(inprocess_swarm, tiny_model_path, monkeypatch):
    """Two peers of the route stop while generating: the second hop's as the client sends a verification
    step (k + 1 positions) to the first hop, so the step is under way when its second hop is gone (the
    first hop's push fails, the client's copy fails, a replacement is rebuilt from the accepted prefix and
    runs the step); then the first hop's between a verification step and its rollback. Every round is a
    function of the tokens alone, so where both stops fall is the same on every run; the tokens stay exact."""
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, SPANS + SPANS, model_id="spec-failover")
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt, expected = repetitive(local, dict(GREEDY, max_new_tokens=16))
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id="spec-failover",
                          step_timeout_s=10)
    client = DistributedModelForCausalLM.from_pretrained(path, client_config=config)
    stopped: list[str] = []

    def stop(peer_id: str) -> None:
        stopped.append(peer_id)
        inprocess_swarm.stop_peer(next(s for s in servers if s.peer_id == peer_id))

    step, rollback = SpanStream.step, InferenceSession.rollback

    async def step_stopping_the_next_hop(self, hidden, position_ids, valid, position, *args, **kwargs):
        if not stopped and self.hop.span.start == 0 and hidden.shape[1] > 1 and position > 0:
            await asyncio.to_thread(stop, client.active_session.route[1].peer_id)  # a verification step
        return await step(self, hidden, position_ids, valid, position, *args, **kwargs)

    def rollback_after_stopping_the_first_hop(self, position):
        if len(stopped) == 1:
            stop(self.route[0].peer_id)
        return rollback(self, position)

    monkeypatch.setattr(SpanStream, "step", step_stopping_the_next_hop)
    monkeypatch.setattr(InferenceSession, "rollback", rollback_after_stopping_the_first_hop)
    try:
        with client.inference_session(max_length=64) as session:
            got = client.generate(prompt, speculative=True, **dict(GREEDY, max_new_tokens=16))
            assert len(stopped) == 2 and session.recoveries == 2
            assert not set(stopped) & {hop.peer_id for hop in session.route}
        assert torch.equal(got, expected)
        assert client.last_speculation.accepted > 0
    finally:
        client.shutdown()
        for server in servers:
            if server in inprocess_swarm.servers:
                inprocess_swarm.stop_peer(server)
