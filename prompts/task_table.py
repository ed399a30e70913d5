"""Every task's latest live version, kept current from the store's change log.

A replica (and the store's quota check) loads the newest snapshot once, then applies only the
entries written after it: `catch_up` costs one failed `open` when nothing changed, and one
task-directory listing per changed task otherwise. No call is proportional to the number of
tasks, except start-up without any snapshot (one full scan, then a snapshot is written).

Applying an entry re-reads the one task it names (and the claim on its id), so an entry is
idempotent and the table always agrees with the version files. Entries are written before
their change (change_log.py): if the task's files do not show the change yet, the task stays
*pending* and is re-read on every `catch_up` until a version file at or past the entry's
number appears, or for `PENDING_GRACE_S` (a writer that crashed before writing its version
never completes it; a writer slower than half that logs its change again).

Writers mutate the maps only under `lock`; readers of one key (`resolve`) need no lock, as
dict reads are atomic. Listings copy what they need under the lock.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Iterable

from .change_log import Change, ChangeLog
from .ids import format_task_ref
from .namespace import TaskKey, TaskNamespace
from .records import PromptMeta

if TYPE_CHECKING:
    from .store import PromptStore

log = logging.getLogger(__name__)

PENDING_GRACE_S = 120.0
# Pending tasks are re-read at most this often (each is a directory listing; with many
# registrations in flight, every catch_up re-reading all of them would cost more than the rest).
PENDING_RECHECK_S = 0.05
# How far back a start-up without a snapshot replays entries, for changes announced before its
# scan whose files landed after the scan read them.
_BOOTSTRAP_REPLAY_S = PENDING_GRACE_S
# 2: metadata stored by column (one list per PromptMeta field), which parses several times faster
# than one JSON object per task; 1 (one object per task) is still read.
_SNAPSHOT_FORMAT = 2
_META_FIELDS = [f.name for f in fields(PromptMeta)]


class TaskTable:
    def __init__(self, store: "PromptStore", changes: ChangeLog, *, snapshot_every: int = 10_000,
                 reconcile_interval_s: float = 0.0) -> None:
        self._store = store
        self._log = changes
        self.snapshot_every = snapshot_every
        self.reconcile_interval_s = reconcile_interval_s
        self._last_reconcile = time.monotonic()  # the first reconciliation comes one interval after start
        self.lock = threading.RLock()
        self.latest: dict[TaskKey, PromptMeta] = {}
        self.published: dict[str, PromptMeta] = {}  # task id -> its published version
        self.namespace = TaskNamespace(latest=self.latest, published=self.published)  # live view, same dicts
        self._by_tenant: dict[str, dict[str, PromptMeta]] = {}
        self._shared: dict[TaskKey, PromptMeta] = {}  # other tenants may call these as owner/task
        self._claims: dict[str, str] = {}  # task id -> owner holding it
        self._rows: dict[str, int] = {}  # tenant -> rows of its latest versions
        self._pending: dict[TaskKey, tuple[int, float]] = {}  # key -> (version awaited, since monotonic)
        self.applied = 0  # every entry up to this sequence number is applied
        self._snapshot_seq = 0
        self._changes_since_snapshot = 0  # changes applied since `_snapshot_seq` (as far as this process saw)
        self._last_recheck = 0.0
        self._loaded = False
        self.stats = {"changes_applied": 0, "full_scans": 0, "snapshots_written": 0, "snapshot_loaded": 0,
                      "reloads": 0, "reconciliations": 0, "reconciled_tasks": 0}

    # ---------------------------------------------------------------- keeping current
    def catch_up(self, tenant: str | None = None) -> int:
        """Apply every entry written since the last call; returns how many. `tenant`: re-read
        that tenant's pending tasks now (the quota check, and a replica making its own
        registration usable at once), not only every PENDING_RECHECK_S."""
        with self.lock:
            if not self._loaded:
                self._load()
            applied = 0
            for change in self._log.read_after(self.applied):
                self._apply(change)
                self.applied = change.seq
                applied += 1
            if self._log.fell_behind(self.applied):
                # Entries this table still needed were compacted away: start over from the newest snapshot.
                log.info("change log: entries after %d were compacted; reloading the newest snapshot", self.applied)
                self.stats["reloads"] += 1
                self._loaded = False
                self._load()
                for change in self._log.read_after(self.applied):
                    self._apply(change)
                    self.applied = change.seq
                    applied += 1
            if self._pending:
                now = time.monotonic()
                if now - self._last_recheck >= PENDING_RECHECK_S:
                    self._last_recheck = now
                    self._recheck_pending()
                elif tenant is not None:
                    self._recheck_pending(tenant)
            self.stats["changes_applied"] += applied
            self._changes_since_snapshot += applied
            # Entries or changes: a RegisterPrompts group is one entry naming many tasks.
            if self.snapshot_every and max(self.applied - self._snapshot_seq,
                                           self._changes_since_snapshot) >= self.snapshot_every:
                self.write_snapshot()
            return applied

    def _apply(self, change: Change) -> None:
        if change.op == "unreadable":
            self._full_scan()  # cannot tell which task it named
            return
        key = (change.tenant, change.task)
        # Look for the announced file *before* re-reading the task: a file that lands in between
        # is then still awaited, never taken as read.
        landed = change.op not in ("register", "delete") or self._store.has_version_at_least(key, change.version)
        self._reread(key)
        self._reread_claim(change.task)
        if not landed:
            awaited, since = self._pending.get(key, (0, time.monotonic()))
            self._pending[key] = (max(awaited, change.version), since)  # wait for the newest announced

    def refresh(self, tenant: str | None = None) -> int:
        """What a replica calls to stay current: apply the store's new changes (returns how
        many). `tenant`: also settle that tenant's changes still in flight now (after its own
        registration or delete). The periodic refresh (no `tenant`) also reconciles with a full
        listing when that is configured and due."""
        applied = self.catch_up(tenant)
        if tenant is None:
            applied += self.reconcile_if_due()
        return applied

    def reconcile_if_due(self) -> int:
        """`reconcile` when `reconcile_interval_s` (0: never) has passed since the last one."""
        if not self.reconcile_interval_s or time.monotonic() - self._last_reconcile < self.reconcile_interval_s:
            return 0
        self._last_reconcile = time.monotonic()
        return self.reconcile()

    def reconcile(self) -> int:
        """List the whole store and re-read every task (and published id) the table disagrees
        with: picks up writers that log nothing. Re-reading a task is what applying an entry
        does, so a registration racing the listing is never undone. Returns how many it fixed."""
        scan = self._store.snapshot()  # outside the lock: a full listing is slow
        claims = self._store.published_claims()
        with self.lock:
            # Entries come before their files: whatever logged change the listing saw is applied now,
            # so a task still newer in the listing than in the table was changed without an entry.
            self.catch_up()
            keys = {k for k in scan.keys() | self.latest.keys() if scan.get(k) != self.latest.get(k)}
            for key in keys:
                self._reread(key)
            tasks = {t for t in claims.keys() | self._claims.keys() if claims.get(t) != self._claims.get(t)}
            for task in tasks | {task for _, task in keys}:
                self._reread_claim(task)
            fixed = sum(1 for k in keys if scan.get(k) == self.latest.get(k)) + len(tasks)
        if fixed:
            log.warning("prompt store: %d tasks changed without a change-log entry (a writer that logs nothing: "
                        "upgrade it); the periodic reconciliation picked them up", fixed)
        self.stats["reconciliations"] += 1
        self.stats["reconciled_tasks"] += fixed
        return fixed

    def _recheck_pending(self, tenant: str | None = None) -> None:
        now = time.monotonic()
        for key, (version, since) in list(self._pending.items()):
            if tenant is not None and key[0] != tenant:
                continue
            if self._store.has_version_at_least(key, version):
                self._reread(key)
                self._reread_claim(key[1])
                del self._pending[key]
            elif now - since > PENDING_GRACE_S:
                log.info("change log: version %d of %s/%s never appeared (its writer stopped before writing "
                         "it); no longer waiting for it", version, *key)
                del self._pending[key]

    def _reread(self, key: TaskKey) -> None:
        self._set(key, self._store.latest_or_none(*key))

    def _reread_claim(self, task: str) -> None:
        owner = self._store.claim_holder(task)
        if owner is None:
            self._claims.pop(task, None)
        else:
            self._claims[task] = owner
        self._update_published(task)

    def _set(self, key: TaskKey, meta: PromptMeta | None) -> None:
        tenant, task = key
        old = self.latest.get(key)
        if old is meta:
            return
        if old is not None:
            self._rows[tenant] -= old.length
        if meta is None:
            self.latest.pop(key, None)
            self._shared.pop(key, None)
            own = self._by_tenant.get(tenant)
            if own is not None:
                own.pop(task, None)
                if not own:
                    del self._by_tenant[tenant]
                    self._rows.pop(tenant, None)
        else:
            self.latest[key] = meta
            self._by_tenant.setdefault(tenant, {})[task] = meta
            self._rows[tenant] = self._rows.get(tenant, 0) + meta.length
            if meta.shared:
                self._shared[key] = meta
            else:
                self._shared.pop(key, None)
        if self._claims.get(task) == tenant:
            self._update_published(task)

    def _update_published(self, task: str) -> None:
        owner = self._claims.get(task)
        meta = None if owner is None else self.latest.get((owner, task))
        if meta is not None and meta.published:
            self.published[task] = meta
        else:
            self.published.pop(task, None)

    # ---------------------------------------------------------------- start-up
    def _load(self) -> None:
        snapshot = self._log.latest_snapshot()
        if snapshot is not None and snapshot[1].get("format") in (1, _SNAPSHOT_FORMAT):
            seq, payload = snapshot
            try:
                metas = _metas_from_snapshot(payload)
                claims = {str(task): str(owner) for task, owner in payload["claims"].items()}
                pending = [(str(t), str(k), int(v)) for t, k, v in payload["pending"]]
            except (KeyError, TypeError, ValueError) as error:
                log.warning("change log: snapshot %d is unusable (%s); scanning the store instead", seq, error)
            else:
                self._fill(metas, claims)
                now = time.monotonic()
                for tenant, task, version in pending:
                    self._pending[(tenant, task)] = (version, now)
                self.applied = self._snapshot_seq = seq
                self._loaded = True
                self.stats["snapshot_loaded"] = seq
                return
        self._full_scan()
        self._loaded = True

    def _full_scan(self) -> None:
        """The table from a full listing (no usable snapshot, or an unreadable entry)."""
        head = self._log.head()
        started = time.time()
        self._fill(self._store.snapshot().values(), self._store.published_claims())
        self.stats["full_scans"] += 1
        # Entries announced shortly before the scan may name files the scan read too early.
        seq = head
        while seq > 0:
            changes = self._log.read(seq)
            if changes is None or changes[0].time < started - _BOOTSTRAP_REPLAY_S:
                break
            for change in changes:
                if change.op != "unreadable":
                    self._apply(change)
            seq -= 1
        self.applied = max(self.applied, head)
        if head - self._snapshot_seq >= 1 or not self._log.latest_snapshot():
            self.write_snapshot()

    def _fill(self, metas: Iterable[PromptMeta], claims: dict[str, str]) -> None:
        for table in (self.latest, self.published, self._by_tenant, self._shared, self._claims, self._rows):
            table.clear()
        self._pending.clear()
        self._claims.update(claims)
        for meta in metas:
            self._set(meta.key, meta)
        for task in claims:
            self._update_published(task)

    def write_snapshot(self) -> None:
        with self.lock:
            payload = {
                "format": _SNAPSHOT_FORMAT,
                "fields": _META_FIELDS,
                "columns": [[getattr(m, name) for m in self.latest.values()] for name in _META_FIELDS],
                "claims": dict(self._claims),
                "pending": [[t, k, v] for (t, k), (v, _) in self._pending.items()],
            }
            seq = self.applied
        self._log.write_snapshot(seq, payload)
        self._snapshot_seq = seq
        self._changes_since_snapshot = 0
        self.stats["snapshots_written"] += 1

    # ---------------------------------------------------------------- reads
    # A request's task reference resolves through `namespace` (TaskNamespace.resolve): one
    # lookup in the live maps, no lock.
    def usage(self, tenant: str) -> tuple[dict[str, PromptMeta], int]:
        """(task -> latest version, total rows) of one tenant, as of the last catch_up."""
        with self.lock:
            return dict(self._by_tenant.get(tenant, {})), self._rows.get(tenant, 0)

    def tenant_tasks(self, tenant: str) -> list[PromptMeta]:
        """The latest version of each of `tenant`'s tasks, sorted by task id."""
        with self.lock:
            own = list(self._by_tenant.get(tenant, {}).values())
        return sorted(own, key=lambda m: m.task)

    def callable_by(self, tenant: str) -> list[tuple[str, PromptMeta]]:
        """Every task `tenant` can call, once each, with the name to call it by, sorted by name:
        the rules of TaskNamespace.callable_by, over the tenant's own, published and shared
        tasks only (not every task in the store)."""
        with self.lock:
            names: dict[str, PromptMeta] = dict(self._by_tenant.get(tenant, {}))
            for task, meta in self.published.items():
                names.setdefault(task, meta)
            shared = list(self._shared.items())
        reachable_bare = {(m.tenant, m.task) for m in names.values()}
        for (owner, task), meta in shared:
            if owner != tenant and (owner, task) not in reachable_bare:
                names[format_task_ref(owner, task)] = meta
        return sorted(names.items())

    def __len__(self) -> int:
        return len(self.latest)


def _metas_from_snapshot(payload: dict) -> list[PromptMeta]:
    if payload["format"] == 1:
        return [PromptMeta(**record) for record in payload["metas"]]
    names, columns = payload["fields"], payload["columns"]
    if names == _META_FIELDS:
        return [PromptMeta(*row) for row in zip(*columns)]
    known = [i for i, name in enumerate(names) if name in _META_FIELDS]  # a snapshot from another release
    return [PromptMeta(**{names[i]: row[i] for i in known}) for row in zip(*columns)]
