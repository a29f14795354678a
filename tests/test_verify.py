"""Verification of peers' results (client.verify, client.verifier) and report records.

Pure tier: tolerances, the check schedule against its derived bound over seeded trials, the trail, the
report limiter. Swarm tier (real in-process peers, tiny llama): lying peers (tests/liar.py: always, with
probability q, after N honest steps, on one block) are caught, banned and reported, and the output equals
local transformers' greedy reference; honest peers that differ by rounding (float32 with another
attention kernel; bfloat16) are never banned.
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from client import loop
from client.verify import (
    Tolerances,
    Trail,
    expected_steps,
    first_mismatch,
    simulate_catch,
    steps_to_catch,
    tail_bound,
    token_errors,
    wants_check,
)

NUM_LAYERS = 4

# ---------------------------------------------------------------- pure


def test_tolerance_by_precision():
    t = Tolerances()
    assert (t.for_bits(32), t.for_bits(16), t.for_bits(8), t.for_bits(4)) == (1e-3, 5e-2, 0.15, 0.3)


def test_mismatch_ignores_rounding_and_finds_the_first_wrong_position():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 6, 64, generator=g)
    valid = torch.ones(2, 6, dtype=torch.bool)
    rounded = a.to(torch.bfloat16).float()  # bf16 rounding: ~2e-3 relative
    assert first_mismatch(a, a * (1 + 1e-6), valid, Tolerances().float32) is None
    assert first_mismatch(a, rounded, valid, Tolerances().half) is None
    assert first_mismatch(a, rounded, valid, Tolerances().float32) == 0  # bf16 is not float32
    wrong = a.clone()
    wrong[1, 4] += 0.05 * a[1, 4].norm() * torch.randn(64, generator=g) / 8
    assert first_mismatch(a, wrong, valid, Tolerances().float32) == 4
    valid[1, 4] = False  # a padding position is never compared
    assert first_mismatch(a, wrong, valid, Tolerances().float32) is None
    nan = a.clone()
    nan[0, 2, 0] = float("nan")
    assert first_mismatch(a, nan, torch.ones(2, 6, dtype=torch.bool), 1.0) == 2
    assert float(token_errors(a, a, valid).max()) == 0.0


def test_first_check_always_then_probability():
    rng = random.Random(0)
    assert all(wants_check(False, 0.0, rng) for _ in range(10))
    draws = sum(wants_check(True, 0.05, rng) for _ in range(20000))
    assert 800 < draws < 1200


@pytest.mark.parametrize("q, honest", [(1.0, 10), (0.3, 0), (0.05, 0), (1.0, 1), (0.2, 25)])
def test_steps_until_caught_within_the_bound(q, honest):
    """Seeded trials of the schedule the client uses: the empirical tail never exceeds the derived bound
    (beyond sampling noise) and the mean is the derived expectation."""
    p, trials = 0.05, 4000
    rng = random.Random(1234)
    caught = [simulate_catch(p, q, honest, rng) for _ in range(trials)]
    for n in (honest + 10, honest + 40, honest + 90, honest + 150):
        empirical = sum(t > n for t in caught) / trials
        bound = tail_bound(p, q, n, honest)
        assert empirical <= bound + 3 * math.sqrt(bound * (1 - bound) / trials) + 1e-3, (n, empirical, bound)
    mean = sum(caught) / trials
    expected = expected_steps(p, q, honest)
    assert mean <= expected * 1.08 + 1  # the forced first check only shortens it
    n99 = steps_to_catch(p, 0.99, q, honest)
    assert sum(t <= n99 for t in caught) / trials >= 0.985


def test_bound_closed_forms():
    assert steps_to_catch(0.05, 0.99) == 90 and steps_to_catch(0.05, 0.95) == 59
    assert steps_to_catch(0.05, 0.99, honest_steps=100) == 190
    assert tail_bound(0.05, 1.0, 30, 10) == pytest.approx(0.95**20)
    assert tail_bound(0.1, 0.1, 20) == pytest.approx(0.9**20 * 3)
    assert tail_bound(0.1, 0.2, 20) == pytest.approx(0.8**20 + 0.2 * 0.9 * (0.9**20 - 0.8**20) / 0.1)
    assert expected_steps(0.05, 0.5) == pytest.approx(21.0)


def test_trail_serves_the_same_inputs_and_stops_at_a_difference():
    trail = Trail(start=3)
    e = torch.randn(1, 4, 8)
    v = torch.ones(1, 4, dtype=torch.bool)
    out = torch.randn(1, 4, 8)
    trail.record(e[:, :3], v[:, :3], out[:, :3])
    trail.record(e[:, 3:], v[:, 3:], out[:, 3:])
    assert trail.length == 4 and trail.ahead == 0
    assert int(trail.rewind()) == 4 and trail.ahead == 4
    n, served = trail.serve(e[:, :2], v[:, :2])
    assert n == 2 and torch.equal(served, out[:, :2])
    other = e[:, 2:].clone()
    other[0, 1] += 1
    n, served = trail.serve(other, v[:, 2:])
    assert n == 1 and torch.equal(served, out[:, 2:3]) and trail.ahead == 1
    trail.truncate(3 + 3)
    assert trail.length == 3 and trail.ahead == 0


def test_report_limiter():
    from client.verify import ReportLimiter

    now = [0.0]
    limiter = ReportLimiter(2, clock=lambda: now[0])
    assert limiter.allow("a") and not limiter.allow("a") and limiter.allow("b") and not limiter.allow("c")
    now[0] = 3601.0
    assert limiter.allow("a") and limiter.allow("c")


def test_eager_attention_span_equals_transformers_on_a_prompt(tiny_model_path):
    """What the checks caught first: with attn_implementation="eager" a span ran a whole prompt from an empty
    cache without a causal mask (HF's eager attention takes a missing mask as "attend to all", SDPA as
    causal), so an honest-looking peer returned wrong prefill states."""
    from transformers import AutoModelForCausalLM

    from swarm.runtime import SpanModel, load_span
    from swarm.spans import Span

    path = tiny_model_path("llama", NUM_LAYERS)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    span = SpanModel(load_span(path, Span(0, 2), dtype=torch.float32, device="cpu",
                               attn_implementation="eager"))
    hidden = torch.randn(1, 8, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8)[None]
    with torch.inference_mode():
        out = span(hidden, positions, torch.ones(1, 8, dtype=torch.bool), span.new_cache(1, 16))
        x, embeddings = hidden, hf.model.rotary_emb(hidden, positions)
        causal = torch.full((8, 8), float("-inf")).triu(1)[None, None]
        for layer in hf.model.layers[:2]:
            x = layer(x, attention_mask=causal, position_ids=positions, position_embeddings=embeddings)
            x = x[0] if isinstance(x, tuple) else x
    assert float(token_errors(out, x, torch.ones(1, 8, dtype=torch.bool)).max()) < 1e-5


# ---------------------------------------------------------------- report records


def _report(**fields):
    from swarm.records import ReportRecord

    base = dict(model_id="tiny", accused="QmAccused", start=0, end=2, reporter="QmReporter", time=time.time(),
                evidence="ab" * 32)
    return ReportRecord(**{**base, **fields})


def test_report_record_schema():
    from swarm.errors import ProtocolError
    from swarm.records import decode_record, record_key, report_key

    r = _report(witnesses=("QmW1", "QmW2"), rel_error=0.5, position=7)
    assert decode_record(r.to_wire()) == r and record_key(r) == report_key("QmAccused")
    for bad in (dict(reporter="QmAccused"), dict(start=2), dict(evidence="xyz"),
                dict(witnesses=("QmAccused",)),
                dict(time=float("nan")), dict(accused="not base58 0OIl")):
        with pytest.raises(ProtocolError):
            _report(**bad)


def test_report_validator_refuses_forgery_and_long_lives():
    import msgpack

    from swarm.errors import ProtocolError
    from swarm.identity import Identity
    from swarm.records import REPORT_TTL_S, check_stored, dht_key_id, record_key

    with Identity.load_or_create(None) as me, Identity.load_or_create(None) as other:
        mine = me.peer_id.to_base58()
        r = _report(reporter=mine)
        subkey = msgpack.packb(f"{mine}{me.owner_marker}")
        value = msgpack.packb(r.to_wire())
        key = dht_key_id(record_key(r))
        assert check_stored(key, subkey, value, r.time + 60) == r
        forged = msgpack.packb(f"{other.peer_id.to_base58()}{other.owner_marker}")  # another's slot, my name
        with pytest.raises(ProtocolError, match="not its reporter"):
            check_stored(key, forged, value, r.time + 60)
        old = _report(reporter=mine, time=time.time() - 1800)  # kept alive past its hour: refused
        with pytest.raises(ProtocolError, match="after its time"):
            check_stored(key, subkey, msgpack.packb(old.to_wire()), old.time + REPORT_TTL_S + 10)
        with pytest.raises(ProtocolError, match="another key|other than"):
            check_stored(dht_key_id("swarm.reports.QmSomeoneElse"), subkey, value, r.time + 60)
        future = _report(reporter=mine, time=time.time() + 3000)
        with pytest.raises(ProtocolError, match="future"):
            check_stored(dht_key_id(record_key(future)), subkey, msgpack.packb(future.to_wire()), future.time)


def test_page_counts_distinct_reporters_and_flags_at_k():
    from bootstrap.health.render import report_html, report_json
    from bootstrap.health.snapshot import Snapshot
    from bootstrap.health.summary import summarize

    reports = {
        "QmHonest": {"QmEvi1": _report(accused="QmHonest", reporter="QmEvi1")},  # one reporter, however often
        "QmLiar": {f"QmR{i + 1}": _report(accused="QmLiar", reporter=f"QmR{i + 1}") for i in range(3)},
        "QmMixed": {"QmR1": _report(accused="QmMixed", reporter="QmR2")},  # contradicts its place: skipped
    }
    report = summarize(Snapshot(reports=reports), time.time(), flag_reporters=3)
    doc = report_json(report, 10)["reports"]
    rows = {r["peer_id"]: r for r in doc["peers"]}
    assert doc["flag_reporters"] == 3 and set(rows) == set()  # no crawl saw these peers: nothing shown
    from bootstrap.health.reports import summarize_reports

    rows = {r.peer_id: r for r in summarize_reports(reports, 3)}
    assert set(rows) == {"QmHonest", "QmLiar"}
    assert rows["QmHonest"].reporters == 1 and not rows["QmHonest"].flagged
    assert rows["QmLiar"].reporters == 3 and rows["QmLiar"].flagged
    html = report_html(report.__class__(**{**report.__dict__, "reported": tuple(rows.values())}), 10)
    assert 'id="reports"' in html and 'data-reporters="3"' in html and 'class="reported flagged"' in html


# ---------------------------------------------------------------- swarm

MODEL_ID = "tiny-verify"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def verify_swarm(inprocess_swarm, tiny_model_path):
    """Two honest peers per half of a 4-block llama (one of each pair with eager attention, so honest
    results differ by rounding), and a maker of lying full-span peers, which routes prefer (one hop)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_path("llama", NUM_LAYERS)
    honest = inprocess_swarm.start_peers(path, ["0:2", "2:4"], model_id=MODEL_ID)
    honest += inprocess_swarm.start_peers(path, ["0:2", "2:4"], model_id=MODEL_ID,
                                          attn_implementation="eager")
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 7]])
    expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    clients = []

    def client(**fields):
        from client import ClientConfig, DistributedModelForCausalLM

        config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=MODEL_ID,
                              step_timeout_s=10, **{"verify_seed": 0, **fields})
        clients.append(DistributedModelForCausalLM.from_pretrained(path, client_config=config))
        return clients[-1]

    yield dict(swarm=inprocess_swarm, path=path, honest=honest, prompt=prompt, expected=expected,
               client=client)
    for c in clients:
        c.shutdown()
    for server in honest:
        inprocess_swarm.stop_peer(server)


def _liar(env, **liar_fields):
    from liar import LyingPeer

    (server,) = env["swarm"].start_peers(env["path"], ["0:4"], model_id=MODEL_ID)
    return LyingPeer(server, **liar_fields).install()


def _generate(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def _honest_ids(env):
    return {s.peer_id for s in env["honest"]}


def test_honest_float32_peers_that_differ_by_rounding_are_never_banned(verify_swarm):
    env = verify_swarm
    model = env["client"](verify_probability=1.0)
    assert torch.equal(_generate(model, env["prompt"]), env["expected"])
    stats = model.verify_stats
    fed = env["prompt"].shape[1] + NEW_TOKENS - 1  # every position fed, on each of the 2 hops, compared
    assert stats.compared_tokens >= 2 * fed and stats.agreed == stats.checks and not stats.convicted
    assert stats.mismatches == 0 and not model.trust.convicted
    assert model.trust.verified <= _honest_ids(env) and model.trust.verified


@pytest.mark.parametrize("kind, fields", [
    ("always", dict()),
    ("probability", dict(probability=0.3, seed=3)),
    ("after N honest steps", dict(honest_steps=5)),
    ("one block only", dict(block=2)),
])
def test_lying_peer_is_caught_banned_reported_and_output_is_exact(verify_swarm, kind, fields):
    from swarm import records

    env = verify_swarm
    liar = _liar(env, **fields)
    try:
        model = env["client"](verify_probability=0.3)
        out = _generate(model, env["prompt"])
        assert torch.equal(out, env["expected"]), kind
        assert liar.lies > 0, "the liar never lied: the test would prove nothing"
        assert set(model.trust.convicted) == {liar.peer_id}
        stats = model.verify_stats
        assert stats.rewinds >= 1 and stats.caught_at[liar.peer_id] >= 1
        deadline = time.monotonic() + 20
        while model.verify_stats.reports < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # the report goes out beside the generation
        p2p, dht = env["swarm"]._bootstrap
        found = env["swarm"]._run(records.fetch_reports(dht, [liar.peer_id], timeout_s=5))
        (report,) = found[liar.peer_id].values()
        assert report.accused == liar.peer_id and (report.start, report.end) == (0, 4)
        assert report.model_id == MODEL_ID and set(report.witnesses) <= _honest_ids(env)
        # the same client again: the liar stays out of its routes
        liar_steps = stats.peer_steps[liar.peer_id]
        assert torch.equal(_generate(model, env["prompt"]), env["expected"])
        assert set(model.trust.convicted) == {liar.peer_id} and stats.peer_steps[liar.peer_id] == liar_steps
    finally:
        liar.uninstall()
        env["swarm"].stop_peer(liar.server)


@pytest.mark.parametrize("stream", [False, True])
def test_api_engine_repairs_a_generation_through_a_liar(verify_swarm, stream):
    """`swarm api`'s generations (client.engine) are checked as `generate` is: a reply that does not
    stream comes whole once checked, equal to local transformers' even when its route lied; a streamed
    one equals it too, or (text already sent was wrong) ends with a clear SessionError."""
    from transformers import AutoTokenizer

    from client.engine import Generation, Sampling
    from swarm.errors import SessionError

    env = verify_swarm
    tokenizer = AutoTokenizer.from_pretrained(env["path"])
    prompt = env["prompt"][0].tolist()
    expected = tokenizer.decode(env["expected"][0, len(prompt):].tolist(), skip_special_tokens=True)
    liar = _liar(env, honest_steps=3)
    try:
        model = env["client"](verify_probability=0.3)
        generation = Generation(model, tokenizer, prompt, Sampling(NEW_TOKENS, 0.0, 1.0, None, ()), stream=stream)
        try:
            pieces = list(generation)
        except SessionError as e:
            assert stream and "send the request again" in str(e)
        else:
            assert "".join(p.text for p in pieces) == expected
            assert pieces[-1].finish_reason == "length" and (stream or len(pieces) == 1)
        assert liar.lies > 0 and set(model.trust.convicted) == {liar.peer_id}
        assert model.verify_stats.rewinds >= 1
    finally:
        liar.uninstall()
        env["swarm"].stop_peer(liar.server)


def test_liar_whose_inputs_were_pushed_is_caught_without_framing_anyone(verify_swarm):
    """A lying second hop (blocks 2:4) whose inputs the first peer pushed to it: a disagreement on a pushed
    input convicts nobody (a lying pusher could have sent it something else than it told the client); the
    session stops pushing, replays, and the liar is convicted on inputs the client sent itself."""
    import time as clock

    from liar import LyingPeer

    env = verify_swarm
    (server,) = env["swarm"].start_peers(env["path"], ["2:4"], model_id=MODEL_ID)
    liar = LyingPeer(server).install()
    try:
        model = env["client"](verify_probability=0.3)
        now = clock.monotonic()  # measured round trips that make the liar the cheapest hop for 2:4
        model.latencies._rtt.update({s.peer_id: (0.05, now) for s in env["honest"]})
        model.latencies._rtt[liar.peer_id] = (0.0, now)
        assert torch.equal(_generate(model, env["prompt"]), env["expected"])
        stats = model.verify_stats
        assert set(model.trust.convicted) == {liar.peer_id} and stats.ambiguous >= 1 and liar.lies > 0
    finally:
        liar.uninstall()
        env["swarm"].stop_peer(server)


def test_one_reporter_cannot_get_an_honest_peer_banned_or_flagged(verify_swarm):
    """A malicious client reports an honest peer again and again: the DHT holds one report of its, the page
    counts one reporter (not flagged), and another client still routes through the peer."""
    import dataclasses

    from bootstrap.health.config import HealthConfig
    from bootstrap.health.crawler import Crawler
    from bootstrap.health.summary import summarize
    from swarm import records

    env = verify_swarm
    swarm = env["swarm"]
    victim = env["honest"][0].peer_id
    evil = env["client"](verify_probability=0.0)
    transport = swarm_run_client(evil)
    me = transport.identity.peer_id.to_base58()
    for i in range(5):
        report = _report(accused=victim, reporter=me, model_id=MODEL_ID, time=time.time(),
                         evidence=f"{i:02x}" * 32)
        assert swarm_run_client(evil, records.announce_report(transport.dht, transport.identity, report))
    with pytest.raises(Exception, match="cannot be signed"):
        swarm_run_client(evil, records.announce_report(
            transport.dht, transport.identity, dataclasses.replace(report, reporter="QmSomebodyE1se")))
    p2p, dht = swarm._bootstrap
    found = swarm._run(records.fetch_reports(dht, [victim], timeout_s=5))
    assert list(found[victim]) == [me]
    snapshot = swarm._run(Crawler(dht, p2p, HealthConfig(refresh_s=5)).crawl())
    (row,) = [r for r in summarize(snapshot, time.time(), 3).reported if r.peer_id == victim]
    assert row.reporters == 1 and not row.flagged
    honest_client = env["client"](verify_probability=0.0, blocked_peers=tuple(
        s.peer_id for s in env["honest"] if s.span == env["honest"][0].span and s.peer_id != victim))
    assert torch.equal(_generate(honest_client, env["prompt"]), env["expected"])
    assert not honest_client.trust.convicted and not honest_client.bans.is_banned(victim)


def swarm_run_client(model, coro=None):
    """The model's transport (started on the client loop), or the result of `coro` run there."""
    from client import loop

    if coro is None:
        return loop.run(model.transport(), timeout_s=60)
    return loop.run(coro, timeout_s=60)


BF16_MODEL_ID = "tiny-verify-bf16"


def test_honest_bfloat16_peers_that_differ_by_rounding_are_never_banned(inprocess_swarm, tiny_model_path):
    """bf16 peers with different attention kernels round differently; checks on every step still agree
    (within the 16-bit tolerance) and nobody is banned. On the GPU machine the peers run on cuda."""
    from client import ClientConfig, DistributedModelForCausalLM

    path = tiny_model_path("llama", NUM_LAYERS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(model_id=BF16_MODEL_ID, dtype="bfloat16", device=device)
    servers = inprocess_swarm.start_peers(path, ["0:4"], **fields)
    servers += inprocess_swarm.start_peers(path, ["0:4"], **fields, attn_implementation="eager")
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=BF16_MODEL_ID,
                          step_timeout_s=10, verify_probability=1.0, verify_seed=0)
    model = DistributedModelForCausalLM.from_pretrained(path, client_config=config)
    try:
        model.generate(torch.tensor([[1, 5, 9, 13, 17, 21, 2, 7]]), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0)
        stats = model.verify_stats
        assert stats.compared_tokens >= 8 + NEW_TOKENS - 1 and stats.agreed == stats.checks
        assert stats.mismatches == 0 and not model.trust.convicted
        assert 0 < stats.max_agreeing_error < Tolerances().half  # they do differ, by rounding only
    finally:
        model.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def test_a_check_without_a_second_peer_reads_no_extra_snapshot(inprocess_swarm, tiny_model_path):
    """With one peer per span a check finds nobody to compare with: it says so (unverifiable) from the
    snapshot the client routed with, instead of reading the DHT again; the generation goes on unchecked."""
    from client import ClientConfig, DistributedModelForCausalLM

    path = tiny_model_path("llama", NUM_LAYERS)
    model_id = "verify-lone-peer"
    servers = inprocess_swarm.start_peers(path, ["0:4"], model_id=model_id)
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=model_id,
                          step_timeout_s=10, verify_probability=1.0, verify_seed=0, snapshot_max_age_s=600)
    model = DistributedModelForCausalLM.from_pretrained(path, client_config=config)
    try:
        transport = loop.run(model.transport(), timeout_s=30)
        reads = []
        fetch = transport.fetch_blocks

        async def counted(*args, **kwargs):
            reads.append(args)
            return await fetch(*args, **kwargs)

        transport.fetch_blocks = counted
        model.generate(torch.tensor([[1, 5, 9, 13, 17, 21, 2, 7]]), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0)
        assert model.verify_stats.unverifiable >= 1 and model.verify_stats.checks == 0
        assert len(reads) == 1  # the route's; the check used the same snapshot
    finally:
        model.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)
