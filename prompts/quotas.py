"""Per-tenant limits on what the prompt store keeps (config keys under `store`).

Prompts and rows count each task's latest live version: that is what replicas index and load
into the device bank. Older versions stay on disk for GetPrompt and export and do not count.
The store checks a registration against these while it holds the tenant's lock file, so
concurrent registrations from any number of processes or replicas sharing the volume see
each other's writes: the limits are exact wherever the volume honours `flock` (local disks,
NFSv4). On a volume without working locks they may be exceeded by at most one registration
per concurrent writer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import QuotaExceededError


@dataclass(frozen=True)
class StoreQuotas:
    max_prompts_per_tenant: int = 10_000
    max_rows_per_tenant: int = 1_048_576
    max_description_bytes: int = 4096

    def check_description(self, tenant: str, description: str) -> None:
        size = len(description.encode("utf-8"))
        if size > self.max_description_bytes:
            raise QuotaExceededError(
                f"description of {size} bytes exceeds the quota of {self.max_description_bytes} bytes "
                "(store.max_description_bytes); shorten it (it is shown in listings, not used for generation)"
            )

    def check_usage(self, tenant: str, *, prompts: int, rows: int) -> None:
        """`prompts` and `rows`: the tenant's totals as they would be after the registration."""
        if prompts > self.max_prompts_per_tenant:
            raise QuotaExceededError(
                f"tenant {tenant!r} would have {prompts} prompts, over its quota of {self.max_prompts_per_tenant} "
                "(store.max_prompts_per_tenant); delete tasks it no longer uses, or ask the operator to raise "
                "the quota"
            )
        if rows > self.max_rows_per_tenant:
            raise QuotaExceededError(
                f"tenant {tenant!r} would hold {rows} prompt rows (latest versions, all tasks), over its quota "
                f"of {self.max_rows_per_tenant} (store.max_rows_per_tenant); use shorter prompts, delete tasks "
                "it no longer uses, or ask the operator to raise the quota"
            )
