"""The device prompt bank: a bounded LRU cache of prompt rows on the model's device.

All cached prompts live as rows of ONE preallocated tensor `[pages * page_rows, D]`, so the
batch op gathers any mix of prompts with one kernel. Space is handed out in fixed-size pages
(no compaction is ever needed: any free page fits any prompt's next chunk); a prompt longer
than a page spans several pages, which become several (offset, length) segments. A batch
holds a lease that pins its prompts, so eviction never disturbs a batch in flight.
Versions are immutable, so entries are keyed by (tenant, task, version) and never go stale.

Below it sits an optional host-memory tier (`HostPromptCache`): a miss here copies the
prompt's rows from host memory, and `prefetch` fills that tier when a request is admitted, so
a batch does not read the disk for a cold task. `tier_stats` reports both tiers.

Under both sits the store, read through `load_stored_prompt`: the one place a version's
tensor is read and checked against what the index promised and what the model needs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from promptmux.prompts.errors import (
    PromptmuxError,
    PromptUnusableError,
    ResourceExhaustedError,
    TaskNotFoundError,
)
from promptmux.prompts.records import PromptMeta
from promptmux.prompts.store import PromptStore

Segment = tuple[int, int]  # (first bank row, rows)
VersionKey = tuple[str, str, int]


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rows_in_use: int = 0
    capacity_rows: int = 0


class HostPromptCache:
    """The host-memory tier, between the device bank and the store on disk: a bounded LRU of
    prompt tensors `[L, D]`.

    A request's prompts are read into it when the request is admitted (`prefetch`, from
    Engine.prepare, on a worker thread), so the batch that runs it only copies host rows to the
    device: a cold task costs its batch-mates a host-to-device copy, never a disk read. Tensors
    are kept in the bank's dtype, and in pinned (page-locked) memory when the bank is on CUDA,
    so that copy is a direct DMA that does not block the host (`non_blocking=True`). The
    capacity is in rows of d_model (`engine.prompt_host_cache_rows`; 0 turns the tier off)."""

    def __init__(
        self,
        *,
        capacity_rows: int,
        dtype: torch.dtype,
        pin: bool,
        loader: Callable[[PromptMeta], torch.Tensor],
    ) -> None:
        self.capacity_rows = capacity_rows
        self.dtype = dtype
        self.pin = pin
        self._loader = loader
        self._entries: OrderedDict[VersionKey, torch.Tensor] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.stats = TierStats(capacity_rows=capacity_rows)

    def get(self, meta: PromptMeta) -> torch.Tensor:
        """The prompt's rows `[L, D]` on the host (pinned on CUDA), from this tier or the store."""
        key = (meta.tenant, meta.task, meta.version)
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return tensor
            self.stats.misses += 1
        tensor = self._load(meta)  # disk I/O outside the lock: other lookups proceed meanwhile
        with self._lock:
            if key not in self._entries and tensor.shape[0] <= self.capacity_rows:
                while self.stats.rows_in_use + tensor.shape[0] > self.capacity_rows:
                    _, victim = self._entries.popitem(last=False)
                    self.stats.rows_in_use -= victim.shape[0]
                    self.stats.evictions += 1
                self._entries[key] = tensor
                self.stats.rows_in_use += tensor.shape[0]
        return tensor

    def prefetch(self, metas: Sequence[PromptMeta]) -> None:
        """Read each prompt into this tier now (at admission), so a batch never waits on disk.
        Raises the store's error (e.g. an unreadable version) for this request alone."""
        for meta in metas:
            self.get(meta)

    def _load(self, meta: PromptMeta) -> torch.Tensor:
        tensor = self._loader(meta).to(self.dtype).contiguous()  # [L, D]
        return tensor.pin_memory() if self.pin else tensor

    def __contains__(self, key: VersionKey) -> bool:
        return key in self._entries


@dataclass
class _Entry:
    pages: list[int]
    segments: list[Segment]
    rows: int
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
        host_capacity_rows: int = 0,
    ) -> None:
        if capacity_rows < page_rows or page_rows < 1:
            raise ValueError(
                f"prompt cache needs capacity_rows >= page_rows >= 1, got {capacity_rows} and {page_rows}"
            )
        self.page_rows = page_rows
        self.num_pages = capacity_rows // page_rows
        self.rows = torch.zeros(self.num_pages * page_rows, d_model, dtype=dtype, device=device)  # [R, D]
        # The host tier, if any, sits in the loader path: a device miss reads from it, it reads the store.
        self.host = None
        if host_capacity_rows > 0:
            self.host = HostPromptCache(capacity_rows=host_capacity_rows, dtype=dtype,
                                        pin=torch.device(device).type == "cuda", loader=loader)
            loader = self.host.get
        self._loader = loader
        self._rows_in_use = 0
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

    def prefetch(self, metas: Sequence[PromptMeta]) -> None:
        """Bring prompts not on the device into the host tier now (at a request's admission, off
        the batch path). Raises the store's error for an unreadable prompt, failing that request
        alone instead of the batch it would have joined. No-op without a host tier."""
        if self.host is not None:
            self.host.prefetch([m for m in metas if (m.tenant, m.task, m.version) not in self._entries])

    def tier_stats(self) -> dict[str, TierStats]:
        """Hits, misses, evictions and rows in use of each tier ("device", and "host" if any)."""
        with self._lock:
            tiers = {"device": TierStats(self.stats.hits, self.stats.misses, self.stats.evictions,
                                         self._rows_in_use, self.num_pages * self.page_rows)}
        if self.host is not None:
            host = self.host.stats
            tiers["host"] = TierStats(host.hits, host.misses, host.evictions, host.rows_in_use, host.capacity_rows)
        return tiers

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
        # From pinned host memory (CUDA) this copy is asynchronous and ordered before the batch's gather.
        self.rows.index_copy_(0, rows, tensor.to(device=self.rows.device, dtype=self.rows.dtype, non_blocking=True))
        self._entries[key] = _Entry(pages=pages, segments=_segments(pages, self.page_rows, tensor.shape[0]),
                                    rows=int(tensor.shape[0]))
        self._rows_in_use += int(tensor.shape[0])
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
            evicted = self._entries.pop(victim)
            self._free_pages.extend(evicted.pages)
            self._rows_in_use -= evicted.rows
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


def load_stored_prompt(store: PromptStore, d_model: int, meta: PromptMeta) -> torch.Tensor:
    """A prompt version's tensor `[L, D]` on the host, checked against what the index promised
    (`meta`) and what this model needs; any failure names the prompt and fails only the
    requests that use it. The bank's loader: `partial(load_stored_prompt, store, d_model)`."""
    name = f"prompt {meta.task!r} of tenant {meta.tenant!r} (version {meta.version})"
    try:
        tensor = store.get(meta.tenant, meta.task, meta.version).tensor  # [L, D] on the host
    except TaskNotFoundError:
        raise TaskNotFoundError(
            f"the {name} was deleted after this request was accepted; register the task again or "
            "send the request to a task that exists"
        ) from None
    except PromptmuxError:
        raise
    except Exception as error:  # unreadable or corrupt file
        raise PromptUnusableError(
            f"the {name} cannot be read ({type(error).__name__}: {error}); register it again"
        ) from error
    if tensor.dim() != 2 or tensor.shape[1] != d_model or tensor.shape[0] != meta.length:
        raise PromptUnusableError(
            f"the stored {name} has shape {list(tensor.shape)}, but this model needs "
            f"[{meta.length}, {d_model}] (d_model {d_model}); register a prompt made for this model"
        )
    if not torch.isfinite(tensor).all():
        raise PromptUnusableError(f"the stored {name} has non-finite values; register it again")
    return tensor
