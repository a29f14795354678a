"""KVPool: the K/V storage shared by every session on a block range (swarm.runtime.cache).

Regions are placed first-fit, extended in place when the slots after them are free, moved (keeping
each row's used slots) when not; a pool whose free slots are scattered packs its regions within the
same tensor (CUDA graphs recorded over it stay valid), one without room doubles; slots handed out are
zeroed; the sink slot is never handed out.
"""

from __future__ import annotations

import torch

from swarm.runtime.cache import KVBudget, KVCache, KVPool, Region
from swarm.spans import Span

SPAN = Span(3, 5)  # two blocks


def new_pool() -> KVPool:
    return KVPool(SPAN, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")


def fill(pool: KVPool, region: Region, rows: int, capacity: int, length: int, value: float) -> None:
    """Mark each row's first `length` slots (every block, keys and values) with value + row."""
    for row in range(rows):
        start = region.start + row * capacity
        pool.storage[:, :, :, start : start + length] = value + row


def held(pool: KVPool, region: Region, rows: int, capacity: int, length: int) -> list[float]:
    """Each row's used slots, if uniform (every block, keys and values), else None."""
    out = []
    for row in range(rows):
        start = region.start + row * capacity
        part = pool.storage[:, :, :, start : start + length]
        out.append(float(part.flatten()[0]) if bool((part == part.flatten()[0]).all()) else None)
    return out


def test_new_regions_are_zeroed_even_where_a_freed_one_held_data():
    pool = new_pool()
    a, b = Region(), Region()
    pool.resize(a, 1, 0, 16, 0)
    pool.resize(b, 1, 0, 16, 0)  # keeps the pool alive when a goes
    fill(pool, a, 1, 16, 16, float("nan"))
    pool.release(a)
    c = Region()
    pool.resize(c, 1, 0, 16, 0)
    assert c.start == 0  # first fit: a's old slots
    assert bool((pool.storage[:, :, :, 0:16] == 0).all())


def test_a_region_extends_in_place_when_it_can_and_moves_with_its_data_when_not():
    pool = new_pool()
    a = Region()
    pool.resize(a, 1, 0, 16, 0)
    fill(pool, a, 1, 16, 10, 7.0)
    pool.resize(a, 1, 16, 32, 10)  # the slots after it are free
    assert (a.start, a.slots) == (0, 32) and held(pool, a, 1, 32, 10) == [7.0]
    b = Region()
    pool.resize(b, 1, 0, 16, 0)  # right after a
    fill(pool, b, 1, 16, 16, 3.0)
    pool.resize(a, 1, 32, 48, 30)  # blocked by b: moves
    assert a.start >= b.start + b.slots and held(pool, a, 1, 48, 10) == [7.0]
    assert held(pool, b, 1, 16, 16) == [3.0]
    assert pool._free[0] == [0, 32]  # a's old slots are free again


def test_a_region_of_several_rows_keeps_each_rows_slots_when_it_grows():
    pool = new_pool()
    a = Region()
    pool.resize(a, 3, 0, 16, 0)
    fill(pool, a, 3, 16, 12, 10.0)
    pool.resize(a, 3, 16, 32, 12)
    assert a.slots == 96 and held(pool, a, 3, 32, 12) == [10.0, 11.0, 12.0]
    rest = pool.storage[:, :, :, a.start + 12 : a.start + 32]
    assert bool((rest == 0).all())  # the new slots of row 0 are zeroed


def test_scattered_free_slots_are_packed_and_a_full_pool_grows_keeping_every_region():
    pool = new_pool()
    regions = [Region() for _ in range(8)]
    for k, r in enumerate(regions):
        pool.resize(r, 1, 0, 32, 0)
        fill(pool, r, 1, 32, 32, float(k))
    assert pool.slots == 256 and pool.generation == 1 and pool.storage.shape[3] == 256 + 1  # + the sink
    for r in regions[::2]:  # four holes of 32 slots
        pool.release(r)
    big = Region()
    storage = pool.storage
    pool.resize(big, 1, 0, 128, 0)  # 128 free slots, none contiguous: packs in place instead of growing
    assert pool.slots == 256 and pool.generation == 1 and pool.storage is storage  # graphs stay valid
    assert [r.start for r in regions[1::2]] == [0, 32, 64, 96] and big.start == 128
    assert [held(pool, r, 1, 32, 32)[0] for r in regions[1::2]] == [1.0, 3.0, 5.0, 7.0]
    more = Region()
    pool.resize(more, 1, 0, 16, 0)  # full: doubles
    assert pool.slots == 512 and pool.generation == 2 and more.start == 256
    assert [held(pool, r, 1, 32, 32)[0] for r in regions[1::2]] == [1.0, 3.0, 5.0, 7.0]
    for r in regions[1::2] + [big, more]:
        pool.release(r)
    assert pool.used_slots == 0 and pool._free == [[0, 512]]  # the tensor keeps its size


def test_free_runs_merge_back_into_one():
    pool = new_pool()
    regions = [Region() for _ in range(4)]
    for r in regions:
        pool.resize(r, 1, 0, 16, 0)
    keep = Region()
    pool.resize(keep, 1, 0, 16, 0)
    for r in (regions[1], regions[3], regions[0], regions[2]):
        pool.release(r)
    assert pool._free[0] == [0, 64]


def test_cache_reserve_takes_budget_and_pool_slots_and_free_gives_both_back():
    pool = new_pool()
    budget = KVBudget(1 << 20, page_tokens=16)
    cache = KVCache(SPAN, 2, 100, bytes_per_block_token=2 * 2 * 4 * 4, budget=budget, pool=pool)
    cache.reserve(20)
    assert cache.capacity == 32 and cache.region.slots == 64
    assert budget.used_bytes == cache.nbytes == cache.region.slots * pool.slot_bytes
    cache.begin(torch.ones(2, 20, dtype=torch.bool))
    k, v = cache.layer(4)
    assert k.shape == (2, 2, 20, 4) and k.data_ptr() == pool.keys[1][:, cache.region.start].data_ptr()
    assert v[1].data_ptr() == pool.values[1][:, cache.region.start + 32].data_ptr()  # row 1's run
    assert cache.slots() == list(range(0, 20)) + list(range(32, 52))
    cache.free()
    assert budget.used_bytes == 0 and pool.used_slots == 0


def test_a_cache_keeps_a_validity_mask_only_once_a_slot_is_padding():
    pool = new_pool()
    cache = KVCache(SPAN, 2, 100, bytes_per_block_token=2 * 2 * 4 * 4, budget=KVBudget(1 << 20, 16), pool=pool)
    cache.reserve(8)
    cache.begin(torch.ones(2, 3, dtype=torch.bool))
    cache.commit()
    assert not cache.padded and cache.valid.shape == (2, 3) and bool(cache.valid.all())
    padded = torch.tensor([[False, True], [True, True]])
    cache.begin(padded)
    cache.rollback()  # a failed step leaves no trace
    assert not cache.padded and cache.valid.shape == (2, 3)
    cache.begin(padded)
    cache.commit()
    cache.begin(torch.ones(2, 1, dtype=torch.bool))
    assert cache.padded and cache.valid.tolist() == [[True] * 3 + [False, True, True], [True] * 6]
    cache.rollback()
    assert cache.valid.shape == (2, 5) and cache.padded
