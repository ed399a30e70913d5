"""The device prompt bank: a bounded LRU cache of prompt rows on the model's device.

All cached prompts live as rows of ONE preallocated tensor `[pages * page_rows, D]`, so the
batch op gathers any mix of prompts with one kernel. Space is handed out in fixed-size pages
(no compaction is ever needed: any free page fits any prompt's next chunk); a prompt longer
than a page spans several pages, which become several (offset, length) segments. A batch
holds a lease that pins its prompts, so eviction never disturbs a batch in flight.
Versions are immutable, so entries are keyed by (tenant, task, version) and never go stale.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from promptmux.prompts.records import PromptMeta

from .errors import ResourceExhaustedError

Segment = tuple[int, int]  # (first bank row, rows)
VersionKey = tuple[str, str, int]


@dataclass
class _Entry:
    pages: list[int]
    segments: list[Segment]
    pins: int = 0


@dataclass
class BankStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class Lease:
    """Pinned prompts of one batch; `segments[key]` lists where the prompt's rows are."""

    segments: dict[VersionKey, list[Segment]]
    hits: int
    misses: int
    evictions: int
    keys: list[VersionKey] = field(default_factory=list)


class PromptBank:
    def __init__(
        self,
        *,
        capacity_rows: int,
        page_rows: int,
        d_model: int,
        dtype: torch.dtype,
        device: torch.device | str,
        loader: Callable[[PromptMeta], torch.Tensor],
    ) -> None:
        if capacity_rows < page_rows or page_rows < 1:
            raise ValueError(
                f"prompt cache needs capacity_rows >= page_rows >= 1, got {capacity_rows} and {page_rows}"
            )
        self.page_rows = page_rows
        self.num_pages = capacity_rows // page_rows
        self.rows = torch.zeros(self.num_pages * page_rows, d_model, dtype=dtype, device=device)  # [R, D]
        self._loader = loader
        self._entries: OrderedDict[VersionKey, _Entry] = OrderedDict()  # least recently used first
        self._free_pages = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._lock = threading.Lock()
        self.stats = BankStats()

    def lease(self, metas: Sequence[PromptMeta]) -> Lease:
        """Load (if needed) and pin every prompt in `metas` for one batch."""
        keys = list(dict.fromkeys((m.tenant, m.task, m.version) for m in metas))
        by_key = {(m.tenant, m.task, m.version): m for m in metas}
        hits = misses = evictions = 0
        pinned: list[VersionKey] = []
        with self._lock:
            try:
                for key in keys:
                    entry = self._entries.get(key)
                    if entry is None:
                        misses += 1
                        evictions += self._insert(key, by_key[key])
                        entry = self._entries[key]
                    else:
                        hits += 1
                        self._entries.move_to_end(key)
                    entry.pins += 1
                    pinned.append(key)
            except BaseException:
                self._unpin(pinned)  # a failed lease must not leave prompts pinned forever
                raise
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.evictions += evictions
            segments = {key: self._entries[key].segments for key in keys}
        return Lease(segments=segments, hits=hits, misses=misses, evictions=evictions, keys=keys)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._unpin(lease.keys)

    @property
    def cached_versions(self) -> int:
        return len(self._entries)

    def _unpin(self, keys: Sequence[VersionKey]) -> None:
        for key in keys:
            self._entries[key].pins -= 1

    def _insert(self, key: VersionKey, meta: PromptMeta) -> int:
        tensor = self._loader(meta)  # [L, D] on the host
        pages_needed = -(-tensor.shape[0] // self.page_rows)
        evictions = self._make_room(pages_needed)
        pages = [self._free_pages.pop() for _ in range(pages_needed)]
        rows = torch.cat([torch.arange(p * self.page_rows, (p + 1) * self.page_rows) for p in pages])
        rows = rows[: tensor.shape[0]].to(self.rows.device)
        self.rows.index_copy_(0, rows, tensor.to(device=self.rows.device, dtype=self.rows.dtype))
        self._entries[key] = _Entry(pages=pages, segments=_segments(pages, self.page_rows, tensor.shape[0]))
        return evictions

    def _make_room(self, pages_needed: int) -> int:
        if pages_needed > self.num_pages:
            raise ResourceExhaustedError(
                f"a prompt needs {pages_needed * self.page_rows} cache rows but the prompt cache holds "
                f"{self.num_pages * self.page_rows}; raise engine.prompt_cache_rows"
            )
        evictions = 0
        victims = (key for key, entry in list(self._entries.items()) if entry.pins == 0)
        while len(self._free_pages) < pages_needed:
            victim = next(victims, None)
            if victim is None:
                raise ResourceExhaustedError(
                    "the prompt cache is full of prompts pinned by batches in flight; raise "
                    "engine.prompt_cache_rows or lower engine.max_batch_size"
                )
            self._free_pages.extend(self._entries.pop(victim).pages)
            evictions += 1
        return evictions


def _segments(pages: list[int], page_rows: int, length: int) -> list[Segment]:
    """Merge runs of consecutive pages into (offset, length) segments covering `length` rows."""
    segments: list[Segment] = []
    remaining = length
    for page in pages:
        take = min(page_rows, remaining)
        start = page * page_rows
        if segments and segments[-1][0] + segments[-1][1] == start:
            segments[-1] = (segments[-1][0], segments[-1][1] + take)
        else:
            segments.append((start, take))
        remaining -= take
    return segments


def merge_leases(leases: Sequence[Lease]) -> Lease:
    """One view of several leases (taken one per request), for building one batch. Releasing
    stays per lease."""
    segments: dict[VersionKey, list[Segment]] = {}
    for lease in leases:
        segments.update(lease.segments)
    return Lease(
        segments=segments,
        hits=sum(lease.hits for lease in leases),
        misses=sum(lease.misses for lease in leases),
        evictions=sum(lease.evictions for lease in leases),
        keys=[],  # never released itself
    )
