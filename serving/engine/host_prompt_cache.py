"""The host-memory tier of the prompt cache: a bounded LRU of prompt tensors, between the
device bank (prompt_bank.py) and the store on disk.

A request's prompts are read into this tier when the request is admitted (`prefetch`, from
Engine.prepare, on a worker thread), so the batch that runs it only copies host rows to the
device: a cold task costs its batch-mates a host-to-device copy, never a disk read. Tensors
are kept in the bank's dtype, and in pinned (page-locked) memory when the bank is on CUDA,
so that copy is a direct DMA that does not block the host (`non_blocking=True`).

Versions are immutable, so entries keyed by (tenant, task, version) never go stale; the
capacity is in rows of d_model (`engine.prompt_host_cache_rows`; 0 turns the tier off).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from promptmux.prompts.records import PromptMeta

VersionKey = tuple[str, str, int]


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rows_in_use: int = 0
    capacity_rows: int = 0


class HostPromptCache:
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
