"""The device prompt bank: LRU eviction, pinning, paging and counters."""
from __future__ import annotations

import pytest
import torch

from promptmux.prompts.records import PromptMeta
from promptmux.prompts.errors import ResourceExhaustedError
from promptmux.serving.engine.prompt_bank import PromptBank

D = 8


def meta(task: str, length: int, version: int = 1) -> PromptMeta:
    return PromptMeta("acme", task, version, "h", D, length, "float32", 0.0)


def value(m: PromptMeta) -> torch.Tensor:
    # Every row of every version is distinguishable: row r of (task, version) holds its own value.
    base = hash((m.task, m.version)) % 1000
    return (base + torch.arange(m.length, dtype=torch.float32))[:, None].expand(m.length, D).clone()


def make_bank(capacity_rows=32, page_rows=4):
    loads = []

    def loader(m):
        loads.append(m.task)
        return value(m)

    return PromptBank(capacity_rows=capacity_rows, page_rows=page_rows, d_model=D, dtype=torch.float32,
                      device="cpu", loader=loader), loads


def gathered(bank, lease, m):
    rows = [bank.rows[o : o + n] for o, n in lease.segments[(m.tenant, m.task, m.version)]]
    return torch.cat(rows)


def test_rows_land_where_the_segments_say_and_hits_are_counted():
    bank, loads = make_bank()
    a, b = meta("a", 6), meta("b", 9)
    lease = bank.lease([a, b, a])
    assert torch.equal(gathered(bank, lease, a), value(a)) and torch.equal(gathered(bank, lease, b), value(b))
    assert (lease.hits, lease.misses) == (0, 2) and loads == ["a", "b"]
    bank.release(lease)
    again = bank.lease([b])
    assert (again.hits, again.misses) == (1, 0) and loads == ["a", "b"]
    bank.release(again)


def test_least_recently_used_is_evicted_first():
    bank, _ = make_bank(capacity_rows=16, page_rows=4)  # 4 pages
    for task in ("a", "b", "c", "d"):
        bank.release(bank.lease([meta(task, 4)]))
    bank.release(bank.lease([meta("a", 4)]))  # a is now most recent; b is the oldest
    lease = bank.lease([meta("e", 4)])
    assert lease.evictions == 1 and bank.stats.evictions == 1
    bank.release(lease)
    assert bank.lease([meta("a", 4)]).hits == 1
    assert bank.lease([meta("b", 4)]).misses == 1


def test_pinned_prompts_are_never_evicted_and_a_full_bank_says_so():
    bank, _ = make_bank(capacity_rows=8, page_rows=4)
    held = bank.lease([meta("a", 4), meta("b", 4)])
    with pytest.raises(ResourceExhaustedError, match="pinned by batches in flight"):
        bank.lease([meta("c", 4)])
    assert torch.equal(gathered(bank, held, meta("a", 4)), value(meta("a", 4)))
    bank.release(held)
    bank.release(bank.lease([meta("c", 4)]))


def test_a_failed_lease_unpins_what_it_pinned():
    bank, _ = make_bank(capacity_rows=8, page_rows=4)
    with pytest.raises(ResourceExhaustedError):
        bank.lease([meta("a", 4), meta("b", 4), meta("c", 4)])
    bank.release(bank.lease([meta("x", 4), meta("y", 4)]))  # everything was evictable again


def test_fragmented_pages_become_several_segments():
    bank, _ = make_bank(capacity_rows=16, page_rows=4)
    for task in ("a", "b", "c", "d"):
        bank.release(bank.lease([meta(task, 4)]))
    bank.release(bank.lease([meta("a", 4), meta("c", 4)]))  # b and d are the least recent
    long = meta("long", 7)
    lease = bank.lease([long])
    assert len(lease.segments[("acme", "long", 1)]) == 2  # two non-adjacent free pages
    assert torch.equal(gathered(bank, lease, long), value(long))


def test_versions_are_cached_separately():
    bank, loads = make_bank()
    v1, v2 = meta("a", 4, 1), meta("a", 4, 2)
    lease = bank.lease([v1, v2])
    assert torch.equal(gathered(bank, lease, v1), value(v1)) and torch.equal(gathered(bank, lease, v2), value(v2))
    assert loads == ["a", "a"]


def test_a_prompt_larger_than_the_cache_is_refused_clearly():
    bank, _ = make_bank(capacity_rows=8, page_rows=4)
    with pytest.raises(ResourceExhaustedError, match="needs 12 cache rows but the prompt cache holds 8"):
        bank.lease([meta("huge", 10)])


# ---------------------------------------------------------------------- the host tier
def make_tiered_bank(device_rows=8, host_rows=16, page_rows=4):
    loads = []

    def loader(m):
        loads.append(m.task)
        return value(m)

    bank = PromptBank(capacity_rows=device_rows, page_rows=page_rows, d_model=D, dtype=torch.float32,
                      device="cpu", loader=loader, host_capacity_rows=host_rows)
    return bank, loads


def test_device_misses_are_served_by_the_host_tier_and_each_tier_counts_its_own():
    bank, loads = make_tiered_bank()
    a, b, c = meta("a", 8), meta("b", 8), meta("c", 8)
    for m in (a, b, a):  # the device holds one 8-row prompt: every lease evicts the other
        lease = bank.lease([m])
        assert torch.equal(gathered(bank, lease, m), value(m))
        bank.release(lease)
    assert loads == ["a", "b"]  # the third lease came from host memory, not the store
    tiers = bank.tier_stats()
    assert (tiers["device"].hits, tiers["device"].misses, tiers["device"].evictions) == (0, 3, 2)
    assert (tiers["host"].hits, tiers["host"].misses, tiers["host"].evictions) == (1, 2, 0)
    assert (tiers["device"].rows_in_use, tiers["host"].rows_in_use) == (8, 16)
    bank.release(lease := bank.lease([c]))  # the host tier holds two: c evicts the least recent (b)
    assert bank.tier_stats()["host"].evictions == 1 and bank.tier_stats()["host"].rows_in_use == 16
    bank.lease([b])
    assert loads == ["a", "b", "c", "b"]


def test_prefetch_reads_the_store_at_admission_so_the_lease_does_not():
    bank, loads = make_tiered_bank(device_rows=16, host_rows=64)
    hot, cold = meta("hot", 4), meta("cold", 6)
    bank.release(bank.lease([hot]))
    bank.prefetch([hot, cold])  # hot is on the device already: not read again
    assert loads == ["hot", "cold"]
    lease = bank.lease([hot, cold])
    assert loads == ["hot", "cold"] and torch.equal(gathered(bank, lease, cold), value(cold))


def test_a_prompt_larger_than_the_host_tier_is_passed_through_uncached():
    bank, loads = make_tiered_bank(device_rows=16, host_rows=4)
    big = meta("big", 12)
    bank.release(bank.lease([big]))
    assert bank.tier_stats()["host"].rows_in_use == 0
    assert torch.equal(gathered(bank, bank.lease([big]), big), value(big))


def test_without_a_host_tier_prefetch_reads_nothing_and_only_the_device_tier_reports():
    bank, loads = make_bank()
    bank.prefetch([meta("a", 3)])
    assert loads == [] and set(bank.tier_stats()) == {"device"}
