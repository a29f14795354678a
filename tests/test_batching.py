"""Continuous batching and KV memory on the peer.

- SpanModel.run: many sessions' steps (different lengths, positions, padding, prefill and decode mixed)
  in one forward give what each gives alone, for dense, sliding-window and MoE families (float32);
- Scheduler: steps submitted concurrently are batched; a long prompt is chunked and does not stall
  other sessions' decode steps (bounded wait, in iterations); the long prompt is not starved either;
- KV budget: pages handed out as sessions grow, memory per cached token within 10% of theory, pages
  back on close; a step that needs pages when the budget is full waits until a session closes (never
  evicts); admission waits for memory, then refuses with a clear error;
- end to end: several clients generating at once through a real swarm get the local tokens, and the
  peers ran their steps in shared forwards.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM
from peer.config import PeerConfig
from peer.scheduler import QUIET_FRACTION, Scheduler
from peer.sessions import SessionManager
from swarm.errors import PeerFull, PeerRefused
from swarm.runtime import CacheFull, KVBudget, SpanModel, load_span
from swarm.runtime.batch import Segment
from swarm.spans import Span

HIDDEN = 64  # swarm.tiny's hidden size


@pytest.fixture(scope="module")
def span_models(tiny_model_path):
    cache = {}

    def get(family: str, span=(1, 4)) -> SpanModel:
        if (family, span) not in cache:
            path = tiny_model_path(family)
            cache[family, span] = SpanModel(load_span(path, Span(*span)))
            cache[family, span].source_path = path
        return cache[family, span]

    return get


def step_inputs(rows: int, new: int, start: int, pad: int = 0, seed: int = 0):
    """Hidden states, rotary positions and validity of `new` tokens at slot `start` of a session whose row 0
    has `pad` left-padded slots (the first `pad` slots of its first step)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, new, HIDDEN, generator=g)
    valid = torch.ones(rows, new, dtype=torch.bool)
    before = torch.full((rows,), start)
    if start == 0:
        valid[0, :pad] = False
    else:
        before[0] -= pad
    positions = (before[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    return hidden, positions, valid


def session_plan():
    """A few sessions: (rows, [step lengths], left padding of row 0)."""
    return [(1, [5, 1, 1, 3, 1], 0), (2, [7, 1, 1, 1, 2], 3), (1, [1, 1, 1, 1, 1], 0), (3, [12, 4, 1, 1, 1], 2)]


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen3_moe", None), ("mistral", 6)])
def test_batched_forward_equals_each_alone(span_models, family, window):
    model = span_models(family)
    if window is not None:  # a window shorter than the sessions, so it cuts into their past
        model = SpanModel(load_span(model.source_path, model.span))
        model.windows = [window] * model.span.length
    check_batched_equals_alone(model, tolerance=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_batched_forward_equals_each_alone_bf16_cuda(tiny_model_path, family):
    """bfloat16 on the GPU: batched and alone differ by rounding only (other kernels, other shapes);
    the tolerance on hidden states is 2e-2, absolute and relative."""
    model = SpanModel(load_span(tiny_model_path(family), Span(1, 4), dtype=torch.bfloat16, device="cuda"))
    check_batched_equals_alone(model, tolerance=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 6)])
def test_varlen_flash_batch_equals_sdpa_per_session_bf16_cuda(tiny_model_path, family, window):
    """Sessions with no padding share one varlen flash-attention call per block (over the pool, in place);
    their outputs match each session alone through per-session SDPA (flash off) within 2e-2 in bfloat16,
    sliding window included."""
    path = tiny_model_path(family)
    flash = SpanModel(load_span(path, Span(1, 4), dtype=torch.bfloat16, device="cuda"))
    sdpa = SpanModel(load_span(path, Span(1, 4), dtype=torch.bfloat16, device="cuda"), flash=False)
    if window is not None:
        flash.windows = sdpa.windows = [window] * 3
    plan = [(rows, lengths, 0) for rows, lengths, _ in session_plan()]
    check_batched_equals_alone(flash, tolerance=2e-2, plan=plan, reference=sdpa)
    assert flash.flash and flash.flash_forwards == len(plan[0][1])
    assert not sdpa.flash and sdpa.flash_forwards == 0


def check_batched_equals_alone(model: SpanModel, tolerance: float, plan=None, reference: SpanModel | None = None):
    """Every session of `plan` step by step alone (through `reference`, default `model`), then all of them
    together, step j of each in one forward: the same outputs."""
    plan = plan or session_plan()
    inputs = []
    for k, (rows, lengths, pad) in enumerate(plan):
        steps, at = [], 0
        for j, new in enumerate(lengths):
            h, p, v = step_inputs(rows, new, at, pad, seed=100 * k + j)
            steps.append((h.to(model.dtype), p, v))
            at += new
        inputs.append(steps)
    # alone: every session on its own, step by step
    alone = []
    for (rows, _lengths, _), steps in zip(plan, inputs, strict=True):
        cache = (reference or model).new_cache(rows, 64)
        alone.append([(reference or model)(h, p, v, cache).float().cpu() for h, p, v in steps])
    # together: round j runs every session's step j in one forward (prefill and decode mixed)
    caches = [model.new_cache(rows, 64) for rows, _, _ in plan]
    model.flash_forwards = 0
    for j in range(len(plan[0][1])):
        segments = []
        for cache, steps in zip(caches, inputs, strict=True):
            h, p, v = steps[j]
            cache.reserve(cache.length + h.shape[1])
            segments.append(Segment(cache, h, p, v))
        outs = model.run(segments)
        for k, out in enumerate(outs):
            torch.testing.assert_close(out.float().cpu(), alone[k][j], atol=tolerance, rtol=tolerance)


def test_chunked_prompt_equals_whole(span_models):
    model = span_models("llama")
    h, p, v = step_inputs(2, 40, 0, pad=5)
    whole = model(h, p, v, model.new_cache(2, 64))
    cache = model.new_cache(2, 64)
    parts = [model(h[:, a:b], p[:, a:b], v[:, a:b], cache) for a, b in ((0, 16), (16, 17), (17, 40))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- scheduler


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_long_prompt_does_not_stall_decode_steps(span_models):
    """8 sessions decode while a 600-token prompt runs in 64-token chunks: every decode step is taken by the
    first iteration that starts after it was submitted (counted from outside: at most 3 increments of the
    iteration counter, the one running, one whose pick may just have missed it, and its own), all of them share forwards, and the prompt still advances one
    chunk per iteration (FIFO keeps it first), so it finishes in its 10 chunks' worth of iterations."""
    model = span_models("llama")
    scheduler = Scheduler(model, max_batch_tokens=256, prefill_chunk_tokens=64)
    budget = KVBudget(1 << 30)
    scheduler.start()

    async def main():
        decoders = [model.new_cache(1, 256, budget) for _ in range(8)]
        for k, cache in enumerate(decoders):  # short prompts first
            await scheduler.submit(cache, *step_inputs(1, 4, 0, seed=k))
        long_cache = model.new_cache(1, 1024, budget)
        long_prompt = scheduler.submit(long_cache, *step_inputs(1, 600, 0, seed=99))
        waits = []

        async def decode(k, cache):
            while not long_prompt.done():
                before = scheduler.stats.iterations
                await scheduler.submit(cache, *step_inputs(1, 1, cache.length, seed=cache.length))
                waits.append(scheduler.stats.iterations - before)

        start = scheduler.stats.iterations
        await asyncio.gather(long_prompt, *(decode(k, c) for k, c in enumerate(decoders)))
        return waits, scheduler.stats.iterations - start, long_cache.length

    try:
        waits, iterations, long_length = run_async(main())
    finally:
        scheduler.stop()
    assert long_length == 600
    assert waits and max(waits) <= 3, waits
    assert iterations <= 12, iterations  # 600 / 64 = 10 chunks; decode steps ride along
    assert scheduler.stats.max_batch_segments >= 5


def test_concurrent_steps_are_batched_and_exact(span_models):
    model = span_models("qwen3_moe")
    scheduler = Scheduler(model)
    scheduler.start()
    inputs = [[step_inputs(1, 6, 0, seed=k)] + [step_inputs(1, 1, 6 + j, seed=10 * k + j) for j in range(6)]
              for k in range(6)]
    alone = []
    for steps in inputs:
        cache = model.new_cache(1, 32)
        alone.append([model(*s, cache) for s in steps])

    async def session(steps):
        cache = model.new_cache(1, 32)
        return [await scheduler.submit(cache, *s) for s in steps]

    async def main():
        return await asyncio.gather(*(session(steps) for steps in inputs))

    try:
        together = run_async(main())
    finally:
        scheduler.stop()
    for mine, reference in zip(together, alone, strict=True):
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert scheduler.stats.max_batch_segments >= 2
    assert scheduler.stats.segments > scheduler.stats.iterations


def test_a_lone_sessions_decode_steps_run_inline_and_a_crowd_goes_to_the_compute_thread(span_models, monkeypatch):
    """`alone=True`: a decode step with nothing else queued runs on the submitting (event loop) thread, with
    the same output; a prompt, or a step while another is queued, goes to the compute thread."""
    model = span_models("llama")
    scheduler = Scheduler(model)
    scheduler.start()
    threads = []
    real_run = model.run_packed

    def run(segments, **kwargs):
        threads.append((threading.get_ident(), len(segments)))
        return real_run(segments, **kwargs)

    steps = [step_inputs(1, 70, 0, seed=1)] + [step_inputs(1, 1, 70 + j, seed=2 + j) for j in range(3)]
    reference = model.new_cache(1, 128)
    expected = [model(*s, reference) for s in steps]
    monkeypatch.setattr(model, "run_packed", run)

    async def main():
        me = threading.get_ident()
        cache, other = model.new_cache(1, 128), model.new_cache(1, 128)
        outs = [await scheduler.submit(cache, *s, alone=True) for s in steps]
        ran_inline = [t == me for t, _ in threads]
        threads.clear()
        await scheduler.submit(other, *step_inputs(1, 4, 0, seed=9))
        both = [scheduler.submit(other, *step_inputs(1, 1, 4, seed=10)),
                scheduler.submit(cache, *step_inputs(1, 1, 73, seed=11), alone=True)]
        await asyncio.gather(*both)
        return outs, ran_inline, [t == me for t, _ in threads]

    try:
        outs, ran_inline, crowd_inline = run_async(main())
    finally:
        scheduler.stop()
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ran_inline == [False, True, True, True]  # the 70-token prompt is over INLINE_MAX_TOKENS
    assert not any(crowd_inline), crowd_inline


def test_decode_steps_gather_for_active_sessions_within_the_wait_bound(span_models):
    """batch_wait_s: a decode step waits for the steps of the other sessions that stepped lately, so they
    share one forward; the wait ends once no step has come for the quiet gap (a session that does not
    come costs that gap, not the bound), a steady trickle of steps is held at most the bound, and a
    session alone (or a prompt) does not wait."""
    model = span_models("llama")
    bound = 0.4
    quiet = bound / QUIET_FRACTION  # 50 ms
    scheduler = Scheduler(model, batch_wait_s=bound)
    scheduler.start()

    async def main():
        caches = [model.new_cache(1, 64) for _ in range(24)]
        a, b = caches[:2]
        start = time.monotonic()
        await asyncio.gather(*(scheduler.submit(c, *step_inputs(1, 4, 0, seed=i)) for i, c in enumerate(caches)))
        prompts_s = time.monotonic() - start  # prompts do not wait
        iterations = scheduler.stats.iterations
        # a burst: every session's step, each a fraction of the quiet gap after the one before
        steps = []
        for i, c in enumerate(caches):
            steps.append(scheduler.submit(c, *step_inputs(1, 1, 4, seed=100 + i)))
            if i < 2:
                await asyncio.sleep(quiet / 5)
        await asyncio.gather(*steps)
        together = scheduler.stats.iterations - iterations
        # a trickle: steps keep coming within the quiet gap, longer than the bound
        iterations = scheduler.stats.iterations
        start = time.monotonic()
        steps = []
        for i, c in enumerate(caches):
            steps.append(scheduler.submit(c, *step_inputs(1, 1, 5, seed=200 + i)))
            await asyncio.sleep(quiet / 2.5)  # 20 ms: all 24 arrive over ~0.48 s, past the bound
        first_done = None
        for step in asyncio.as_completed(steps):
            await step
            first_done = first_done or time.monotonic() - start
        trickle = scheduler.stats.iterations - iterations
        # only a and b step now: a's step waits for b, who does not come, for the quiet gap only
        for c in caches[2:]:
            scheduler.release(c)
        await asyncio.gather(scheduler.submit(a, *step_inputs(1, 1, 6, seed=300)),
                             scheduler.submit(b, *step_inputs(1, 1, 6, seed=301)))
        start = time.monotonic()
        await scheduler.submit(a, *step_inputs(1, 1, 7, seed=302))
        missing_s = time.monotonic() - start
        scheduler.release(b)
        start = time.monotonic()
        await scheduler.submit(a, *step_inputs(1, 1, 8, seed=303))  # alone now: no wait
        return prompts_s, together, first_done, trickle, missing_s, time.monotonic() - start

    try:
        prompts_s, together, first_done, trickle, missing_s, alone_s = run_async(main())
    finally:
        scheduler.stop()
    assert together == 1 and scheduler.stats.max_batch_segments == 24
    assert 0.9 * bound <= first_done < bound + 0.3 and trickle >= 2, (first_done, trickle)  # held to the bound
    assert 0.9 * quiet <= missing_s < bound / 2, missing_s
    assert prompts_s < 0.3 and alone_s < quiet, (prompts_s, alone_s)


def test_a_pushed_cohorts_last_step_ends_gathering(span_models):
    """Steps that came in one batch from the previous peer (the last one marked `cohort_end`) run at once,
    without the quiet gap the same steps would wait for a session that stepped lately but is not among them."""
    model = span_models("llama")
    bound = 1.6  # a quiet gap (bound / QUIET_FRACTION) well above a loaded machine's forward
    quiet = bound / QUIET_FRACTION
    scheduler = Scheduler(model, batch_wait_s=bound)
    scheduler.start()

    async def main():
        caches = [model.new_cache(1, 64) for _ in range(3)]
        await asyncio.gather(*(scheduler.submit(c, *step_inputs(1, 4, 0, seed=i)) for i, c in enumerate(caches)))
        waited = []
        for position, marked in ((4, False), (5, True)):  # two of the three sessions step
            iterations, start = scheduler.stats.iterations, time.monotonic()
            await asyncio.gather(scheduler.submit(caches[0], *step_inputs(1, 1, position, seed=10 + position)),
                                 scheduler.submit(caches[1], *step_inputs(1, 1, position, seed=20 + position),
                                                  cohort_end=marked))
            waited.append((time.monotonic() - start, scheduler.stats.iterations - iterations))
        return waited

    try:
        (plain_s, plain_forwards), (cohort_s, cohort_forwards) = run_async(main())
    finally:
        scheduler.stop()
    assert plain_forwards == cohort_forwards == 1
    assert plain_s >= 0.9 * quiet and cohort_s < quiet / 2, (plain_s, cohort_s)


# ---------------------------------------------------------------- KV memory


def test_pages_follow_use_not_the_declared_length(span_models):
    model = span_models("llama")
    per_token = model.bytes_per_block_token * 3  # span 1:4
    budget = KVBudget(100 * 1024 * per_token, page_tokens=16)
    cache = model.new_cache(2, 8192, budget)
    model(*step_inputs(2, 10, 0), cache)
    assert budget.used_bytes == 2 * 16 * per_token  # one page per row, not 8192 slots
    for _ in range(400):  # grow one token at a time to 410
        model(*step_inputs(2, 1, cache.length, seed=cache.length), cache)
    stored = cache.region.slots * cache.pool.slot_bytes  # the pool slots this session holds
    assert stored == budget.used_bytes == cache.nbytes
    theory = cache.tokens * per_token
    assert theory <= stored <= 1.1 * theory, (stored, theory)
    cache.free()
    assert budget.used_bytes == 0


def test_growth_waits_for_memory_and_evicts_nobody(span_models):
    """Budget of 3 pages: A holds 1, B holds 2. A's step that needs a 2nd page waits (the scheduler says
    so, admission would hold new sessions), B goes on; when B closes, A's step runs and is exact."""
    model = span_models("llama")
    page = 16
    budget = KVBudget(3 * page * model.bytes_per_block_token * 3, page_tokens=page)
    scheduler = Scheduler(model)
    scheduler.start()
    a_inputs = [step_inputs(1, page, 0, seed=1), step_inputs(1, 1, page, seed=2)]
    reference = model.new_cache(1, 64)
    expected = [model(*s, reference) for s in a_inputs]

    async def main():
        a, b = model.new_cache(1, 64, budget), model.new_cache(1, 64, budget)
        first = await scheduler.submit(a, *a_inputs[0])
        await scheduler.submit(b, *step_inputs(1, 2 * page, 0, seed=3))
        waiting = scheduler.submit(a, *a_inputs[1])
        await asyncio.sleep(0.3)
        assert not waiting.done() and scheduler.memory_waiters
        scheduler.release(b)
        second = await waiting
        return first, second

    try:
        first, second = run_async(main())
    finally:
        scheduler.stop()
    torch.testing.assert_close(first, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, expected[1], atol=1e-4, rtol=1e-4)
    assert not scheduler.memory_waiters


def test_a_step_waits_for_pages_at_most_the_bound(span_models):
    """Pages that never come (a device short of memory): the step fails with CacheFull after
    max_memory_wait_s instead of waiting for ever, and the scheduler goes on serving others."""
    model = span_models("llama")
    page = 16
    budget = KVBudget(page * model.bytes_per_block_token * 3, page_tokens=page)
    scheduler = Scheduler(model, max_memory_wait_s=0.3)
    scheduler.start()

    async def main():
        holder, starved = model.new_cache(1, 64, budget), model.new_cache(1, 64, budget)
        await scheduler.submit(holder, *step_inputs(1, page, 0, seed=1))  # the whole budget
        started = time.monotonic()
        with pytest.raises(CacheFull, match="no KV pages for 0.3 s"):
            await scheduler.submit(starved, *step_inputs(1, 1, 0, seed=2))
        waited = time.monotonic() - started
        assert not scheduler.memory_waiters
        scheduler.release(holder)
        out = await scheduler.submit(starved, *step_inputs(1, 1, 0, seed=2))  # room again: it runs
        return waited, out

    try:
        waited, out = run_async(main())
    finally:
        scheduler.stop()
    assert 0.3 <= waited < 5 and out.shape == (1, 1, model.config.hidden_size)


def test_admission_counts_each_sessions_worst_case(span_models):
    """A budget of 4 pages: a session declaring 2 pages' length is admitted while the committed worst cases
    fit (not what is cached now), a third waits and is refused, a later one gets in once one closes, and
    one that could never fit is refused at once."""
    model = span_models("llama")
    page = 16
    per_token = model.bytes_per_block_token * 3
    budget = KVBudget(4 * page * per_token, page_tokens=page)
    config = PeerConfig(model_path="unused", span=Span(1, 4), admission_timeout_s=0.3)

    async def main():
        manager = SessionManager(config, budget, per_token, lambda r, n, b: model.new_cache(r, n, budget, b),
                                 release=lambda cache: cache.free())
        first = await manager.open("a", (1, 4), 1, 2 * page)
        second = await manager.open("b", (1, 4), 1, 2 * page - 5)  # rounds up to whole pages
        assert budget.used_bytes == 0 and manager.cache_tokens_left == 0  # nothing cached, all committed
        with pytest.raises(PeerFull, match=r"cache full: .* committed to 2 sessions.*\(waited 0.3 s\)"):
            await manager.open("c", (1, 4), 1, 1)
        started = time.monotonic()
        with pytest.raises(PeerFull, match=r"\(waited 0 s\)"):  # the client asked not to wait
            await manager.open("c", (1, 4), 1, 1, wait_s=0.0)
        with pytest.raises(PeerFull, match=r"\(waited 0.3 s\)"):  # nor longer than the peer's own time
            await manager.open("c", (1, 4), 1, 1, wait_s=60.0)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(PeerRefused, match="more than this peer's whole budget") as refused:
            await manager.open("c", (1, 4), 2, 2 * page + 1)  # 2 rows x 3 pages: never fits
        assert not isinstance(refused.value, PeerFull)  # no later open of it could succeed
        assert time.monotonic() - started < 0.2  # refused up front, without waiting
        later = asyncio.create_task(manager.open("c", (1, 4), 1, page))
        await asyncio.sleep(0.1)
        assert not later.done()
        manager.close(first)
        third = await later
        assert manager.active == 2 and manager.cache_tokens_left == page
        for session in (second, third):  # each grows to its declared length: the budget has room
            session.cache.reserve(session.max_length)
        manager.close(second)
        manager.close(third)
        assert budget.used_bytes == 0 and manager.cache_tokens_left == 4 * page

    run_async(main())


@pytest.mark.parametrize("seed", range(12))
def test_any_mix_of_sessions_against_any_budget_never_waits_for_memory(span_models, seed):
    """Random budgets and random crowds (rows, declared lengths, step sizes, close order), all admitted
    sessions stepping at once up to their declared length: every step is served without ever waiting for
    pages (the budget can always serve what admission let in), the rest are refused at open, and the
    budget is whole again after."""
    model = span_models("llama")
    rng = random.Random(seed)
    page = rng.choice([4, 16, 64])
    per_token = model.bytes_per_block_token * 3
    budget = KVBudget(rng.randint(1, 24) * page * per_token, page_tokens=page)
    config = PeerConfig(model_path="unused", span=Span(1, 4), admission_timeout_s=0.0, page_tokens=page)
    scheduler = Scheduler(model, max_batch_tokens=rng.choice([8, 64, 2048]), prefill_chunk_tokens=rng.choice([4, 32]))
    scheduler.start()
    waited_for_memory = []
    crowd = [(rng.choice([1, 1, 2, 3]), rng.randint(1, 6 * page)) for _ in range(rng.randint(2, 10))]

    async def drive(manager, rows, length):
        try:
            session = await manager.open(f"c{rng.random()}", (1, 4), rows, length)
        except PeerRefused:
            return "refused"
        at = 0
        while at < length:
            new = min(length - at, rng.choice([1, 1, 1, 3, 17]))
            step = scheduler.submit(session.cache, *step_inputs(rows, new, at, seed=at))
            waited_for_memory.append(scheduler.memory_waiters)
            await asyncio.wait_for(step, 30)
            at += new
        manager.close(session)
        return "done"

    async def main():
        manager = SessionManager(config, budget, per_token, lambda r, n, b: model.new_cache(r, n, budget, b),
                                 release=scheduler.release, memory_waiters=lambda: scheduler.memory_waiters)
        return await asyncio.gather(*(drive(manager, rows, length) for rows, length in crowd))

    try:
        ended = run_async(main())
    finally:
        scheduler.stop()
    rows, length = crowd[0]  # the first opened on an empty peer: admitted if its worst case fits at all
    if rows * max(-(-length // page), 1) * page * per_token <= budget.total_bytes:
        assert ended[0] == "done", (ended, crowd)
    assert not any(waited_for_memory) and budget.used_bytes == 0


# ---------------------------------------------------------------- end to end


def test_clients_at_once_get_local_tokens_in_shared_forwards(inprocess_swarm, tiny_model_path):
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, ["0:3", "3:6"])
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [torch.tensor([[1, 5 + k, 17 * k % 500 + 3, 44, 9 + k]]) for k in range(4)]
    expected = [local.generate(p, max_new_tokens=16, do_sample=False, pad_token_id=0) for p in prompts]
    config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers))
    clients = [DistributedModelForCausalLM.from_pretrained(path, client_config=config) for _ in prompts]
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def generate(k):
        clients[k].generate(prompts[k], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm up the route
        barrier.wait()
        results[k] = clients[k].generate(prompts[k], max_new_tokens=16, do_sample=False, pad_token_id=0)

    try:
        threads = [threading.Thread(target=generate, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for got, want in zip(results, expected, strict=True):
            assert got is not None and torch.equal(got, want)
        stats = [s.scheduler.stats for s in servers]
        assert all(s.segments > s.iterations for s in stats), [s.as_dict() for s in stats]
        for server in servers:  # the timing figures `info` reports (bench_serving reads them)
            sched, steps = server.info()["scheduler"], server.info()["steps"]
            assert steps["served"] > 0 and sched["wait_s"] >= 0, (sched, steps)
            assert 0 < sched["busy_s"] <= steps["serve_s"] and 0 < steps["answer_s"] < steps["serve_s"], (sched, steps)
        pushes = servers[0].forward_stats  # steps that shared a forward went on to the next peer in one message
        assert pushes.pushed >= 4 * 16 and pushes.push_failed == 0 and pushes.push_messages < pushes.pushed, pushes
    finally:
        for client in clients:
            client.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def test_flash_arguments_name_each_rows_region_and_pad_with_the_sink(span_models):
    """The varlen flash path's arguments (built on the CPU too, used on CUDA): one sequence per row of each
    segment, its queries the step's tokens, its keys its row's region up to the end of the step; graph
    padding rows query the sink slot alone."""
    from swarm.runtime.batch import FlashBatch

    model = span_models("llama")
    a, b = model.new_cache(1, 64), model.new_cache(2, 64)
    segments = []
    for cache, new in ((a, 3), (b, 1)):
        cache.reserve(new)
        segment = Segment(cache, *step_inputs(cache.rows, new, 0))
        cache.begin(segment.valid)
        segments.append(segment)
    meta, max_q, max_k = FlashBatch.meta(segments, rows=5, sink=999)
    flash = FlashBatch(meta, 5, max_q, max_k)
    assert flash.cu_q.tolist() == [0, 3, 4, 5, 6, 7]
    assert flash.cu_k.tolist()[:5] == [a.region.start, b.region.start, b.region.start + b.capacity, 999, 999]
    assert flash.used.tolist() == [3, 1, 1, 1, 1] and (max_q, max_k) == (3, 3)
    for cache in (a, b):
        cache.rollback()
        cache.free()
