"""Durable prompt store, keyed by (tenant, task), with immutable versions.

Layout on disk (works on a local disk and on a shared ReadWriteMany volume):

    <root>/<tenant>/<task>/v00000001.safetensors   one immutable version each
    <root>/<tenant>/<task>/v00000002.safetensors   or a deletion marker (a few fixed bytes): a
                                                   tombstone, and every older version is deleted
    <root>/<tenant>/.lock                          held (flock) while a registration checks quotas
    <root>/.published/<task>                       the claim on a task id in the global namespace;
                                                   it holds the publishing tenant's id
    <root>/.changes/...                            the change log: one entry per registration or
                                                   delete, written before it (change_log.py)

A version appears atomically: it is written to a temporary file, fsynced, then hard-linked
to its final name. The link fails if another writer took that version number, so
concurrent registrations never overwrite each other, and a crash mid-write leaves only an
ignored temporary file.

Version numbers are never reused, also across processes: versions and tombstones share one
name per number, and a name, once linked, is never unlinked. Deleting a task links a
tombstone numbered after every existing version, then atomically replaces each version file
*below the tombstone* by the same deletion marker (the bytes are freed, the number stays
taken). So a writer that picked a number from an older listing fails to link it and takes the
next one, which lies above the tombstone: numbers are taken in increasing order, a delete
never removes a version registered after it, and caches keyed by version stay valid.
(`.deleted` tombstones of stores written before this layout are still honoured.)

Every registration and delete is announced in the change log before its files change, so
replicas keep a table of every task's latest version current by reading only new entries
(task_table.py, `self.tasks`); quotas are checked against that table too.

A corrupt or unreadable file is skipped and logged with its path (once per change of the
file); it never stops listing, resolving or starting a replica. A task whose newest version
is unreadable serves its newest readable version.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from promptmux.prompts.errors import (
    AlreadyExistsError,
    InvalidPromptError,
    PermissionDeniedError,
    PromptmuxError,
    StoredPromptUnreadableError,
    TaskNotFoundError,
    UnavailableError,
)

from .change_log import ChangeLog
from .durable_files import fsync_directory, write_durably
from .ids import ID_PATTERN, check_id, is_valid_id, parse_task_ref
from .namespace import TaskNamespace, task_not_found
from .quotas import StoreQuotas
from .records import SUPPORTED_DTYPES, PromptMeta, Registration, StoredPrompt, content_hash
from .task_table import PENDING_GRACE_S, TaskTable

__all__ = ["ID_PATTERN", "PromptStore", "StoreQuotas"]

log = logging.getLogger(__name__)

_VERSION_FILE = re.compile(r"v(\d{8})\.(safetensors|deleted)\Z")
_TENSOR_KEY = "prompt"
_EMBEDDING_KEY = "task_embedding"  # optional second tensor of a version: its task embedding
_META_KEY = "promptmux"
_STALE_TEMP_SECONDS = 3600
_CLAIMS_DIR = ".published"
# A tombstone's content, and what a deleted version's file is replaced by. No real version file
# is this short (its header alone is longer), so the size tells them apart.
_DELETED = b"promptmux: deleted\n"
_LOCK_FILE = ".lock"
# What reading a damaged file can raise: I/O errors, a bad safetensors header, bad JSON, a
# metadata record with missing or unknown fields.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, struct.error, SafetensorError)


class PromptStore:
    def __init__(
        self,
        root: str | Path,
        *,
        d_model: int,
        max_length: int,
        allowed_tenants: Iterable[str] | None = None,
        quotas: StoreQuotas | None = None,
        snapshot_every: int = 10_000,
        reconcile_interval_s: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.d_model = d_model
        self.max_length = max_length
        self.allowed_tenants = None if allowed_tenants is None else frozenset(allowed_tenants)
        self.quotas = quotas or StoreQuotas()
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta_cache: dict[Path, PromptMeta] = {}  # immutable versions: never invalidated
        self._unreadable: dict[Path, object] = {}  # path -> the file stamp already logged
        # Whether a version file is a deletion marker. A live version only turns into a marker
        # once a newer tombstone exists, and listings stop at the newest tombstone, so a cached
        # answer is never read stale. A reader that listed just before a delete may still open
        # a version the delete has since replaced: `_read_meta` recognises the marker's bytes.
        self._is_marker: dict[Path, bool] = {}
        self.changes = ChangeLog(self.root)
        # Every task's latest version, current as of its last `catch_up` (loaded on first use).
        self.tasks = TaskTable(self, self.changes, snapshot_every=snapshot_every,
                               reconcile_interval_s=reconcile_interval_s)
        self._remove_stale_temp_files()

    # ---------------------------------------------------------------- writes
    def register(
        self,
        tenant: str,
        task: str,
        tensor: torch.Tensor,
        *,
        shared: bool = False,
        publish: bool = False,
        description: str = "",
        extra: dict | None = None,
        check_quotas: bool = True,
        task_embedding: torch.Tensor | None = None,
    ) -> PromptMeta:
        """Validate and store a new version; returns its metadata.

        `shared`: other tenants may call it as `tenant/task`. `publish` (implies shared): put
        the task id in the global namespace, where a bare `task` reaches it for tenants
        without their own `task`; refused with ALREADY_EXISTS while another tenant holds the
        id. The store does not authenticate: the server allows `publish` to admin keys only.
        `check_quotas=False` is for the server's own seeding (demo prompts), never a tenant's call.
        `task_embedding` (an `[L, d_model]` early checkpoint, prompts/task_embedding.py) is kept
        in the same file as a second tensor, so it is as atomic and immutable as the prompt."""
        outcome = self.register_many(
            [Registration(tenant, task, tensor, shared=shared, publish=publish, description=description,
                          extra=extra, task_embedding=task_embedding)],
            check_quotas=check_quotas,
        )[0]
        if isinstance(outcome, PromptmuxError):
            raise outcome
        return outcome

    def register_many(
        self, items: Sequence[Registration], *, check_quotas: bool = True
    ) -> list[PromptMeta | PromptmuxError]:
        """Store many new versions as one group; each item succeeds or fails alone (the error
        it would raise from `register`, in item order).

        The group shares the costs that do not depend on its size: ONE change-log entry
        announces every valid item, each owner's lock is taken and its quotas caught up once,
        and the call returns when every stored version is durable. Quotas count the group's
        earlier items of the same owner. A (tenant, task) named twice in one call fails its
        second item (INVALID_ARGUMENT): one version per task per call."""
        outcomes: list[PromptMeta | PromptmuxError | None] = [None] * len(items)
        prepared: dict[int, dict[str, torch.Tensor]] = {}
        seen: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            try:
                prepared[i] = self._prepare(item, check_quotas, seen)
            except PromptmuxError as error:
                outcomes[i] = error
        by_tenant: dict[str, list[int]] = {}
        for i in prepared:
            by_tenant.setdefault(items[i].tenant, []).append(i)
        with ExitStack() as locks:
            for tenant in sorted(by_tenant):  # one order for every writer: no deadlock between groups
                locks.enter_context(self._tenant_lock(tenant))
            announced: list[int] = []
            for tenant, indices in by_tenant.items():
                if check_quotas:
                    self.tasks.catch_up(tenant)
                    own, rows = self.tasks.usage(tenant)
                    own_rows = {task: meta.length for task, meta in own.items()}
                for i in indices:
                    item = items[i]
                    try:
                        if check_quotas:
                            rows = self._check_usage(tenant, own_rows, rows, item.task, int(item.tensor.shape[0]))
                        if item.publish:
                            self._claim(item.task, tenant)  # no namespace change until a published version exists
                    except PromptmuxError as error:
                        outcomes[i] = error
                        continue
                    announced.append(i)
            if announced:
                announced.sort()  # item order
                started = time.monotonic()
                versions = {i: self._next_version(self._task_dir(items[i].tenant, items[i].task)) for i in announced}
                self.changes.append_many([("register", items[i].tenant, items[i].task, versions[i]) for i in announced])
                for i in announced:
                    outcomes[i] = self._write_version(items[i], prepared[i], versions[i])
                if time.monotonic() - started > PENDING_GRACE_S / 2:  # readers may have stopped waiting
                    stored = [outcomes[i] for i in announced if isinstance(outcomes[i], PromptMeta)]
                    if stored:
                        self.changes.append_many([("register", m.tenant, m.task, m.version) for m in stored])
        return outcomes  # type: ignore[return-value]  (every slot is filled above)

    def _prepare(self, item: Registration, check_quotas: bool, seen: set) -> dict[str, torch.Tensor]:
        """The item's checks that need no lock; returns the tensors to store."""
        self._check_ids(item.tenant, item.task)
        self._check_tenant_allowed(item.tenant)
        if check_quotas:
            self.quotas.check_description(item.tenant, item.description)
        if (item.tenant, item.task) in seen:
            raise InvalidPromptError(
                f"task {item.task!r} of tenant {item.tenant!r} appears more than once in this call; register one "
                "version per task per call (send the later one in another call)"
            )
        tensors = {_TENSOR_KEY: self.validate_tensor(item.tensor)}
        if item.task_embedding is not None:
            tensors[_EMBEDDING_KEY] = self.validate_tensor(item.task_embedding)
        seen.add((item.tenant, item.task))
        return tensors

    def _write_version(self, item: Registration, tensors: dict, version: int) -> PromptMeta | PromptmuxError:
        """Write the item's version file at `version` or, if another writer took it, the next free number."""
        task_dir = self._task_dir(item.tenant, item.task)
        tensor = tensors[_TENSOR_KEY]
        try:
            task_dir.mkdir(parents=True, exist_ok=True)
            while True:
                meta = PromptMeta(
                    tenant=item.tenant,
                    task=item.task,
                    version=version,
                    content_hash=content_hash(tensor),
                    d_model=int(tensor.shape[1]),
                    length=int(tensor.shape[0]),
                    dtype=_dtype_name(tensor.dtype),
                    created_at=time.time(),
                    shared=item.shared or item.publish,
                    description=item.description,
                    extra=dict(item.extra or {}),
                    published=item.publish,
                )
                payload = st_save(tensors, metadata={_META_KEY: meta.to_json()})
                name = f"v{version:08d}.safetensors"
                if _publish(task_dir, name, payload):
                    # Readers re-read this task after its entry: spare them opening the file again.
                    self._meta_cache[task_dir / name] = meta
                    self._is_marker[task_dir / name] = False
                    return meta
                version = self._next_version(task_dir)  # another writer took this number first
        except OSError as error:
            log.error("prompt store: writing version %d of %s/%s failed: %s", version, item.tenant, item.task, error)
            reason = error.strerror or type(error).__name__
            return UnavailableError(
                f"the prompt store could not write task {item.task!r} of tenant {item.tenant!r} ({reason}); nothing "
                "was stored for it: retry later, or ask the operator to check the store's volume"
            )

    def delete(self, tenant: str, task: str) -> int:
        """Delete a task: every version older than the tombstone this writes, and the task's
        claim on its id in the global namespace. Returns how many versions were removed."""
        self._check_ids(tenant, task)
        task_dir = self._task_dir(tenant, task)
        if not self._live_files(task_dir) and self.published_claims().get(task) != tenant:
            raise task_not_found(tenant, task)  # a task whose every version is corrupt can still be deleted
        self.changes.append("delete", tenant, task, self._next_version(task_dir))
        while True:
            tombstone = self._next_version(task_dir)
            if _publish(task_dir, f"v{tombstone:08d}.safetensors", _DELETED):
                break
        removed = 0
        for number, path in _version_entries(task_dir):
            if number < tombstone and path.suffix == ".safetensors" and _replace_with_marker(path):
                self._meta_cache.pop(path, None)
                removed += 1
        if self._release_claim(task, tenant):
            self.changes.append("claim", tenant, task, 0)
        return removed

    # ---------------------------------------------------------------- reads
    def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrompt:
        path = self._version_file(tenant, task, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a store edited by hand; versions themselves are never unlinked
            raise task_not_found(tenant, task) from None
        try:
            tensors = st_load(data)
            tensor = tensors[_TENSOR_KEY]
            meta = self._meta_from_bytes(path, data)
        except _UNREADABLE as error:
            self._log_unreadable(path, error)
            raise StoredPromptUnreadableError(
                f"version {int(path.stem[1:])} of task {task!r} of tenant {tenant!r} is unreadable in the prompt "
                "store (the server log names the file); register a new version or ask the operator to restore it"
            ) from None
        return StoredPrompt(meta=meta, tensor=tensor, task_embedding=tensors.get(_EMBEDDING_KEY))

    def meta(self, tenant: str, task: str, version: int | None = None) -> PromptMeta:
        path = self._version_file(tenant, task, version)
        meta = self._read_meta(path)
        if meta is None:
            raise StoredPromptUnreadableError(
                f"version {int(path.stem[1:])} of task {task!r} of tenant {tenant!r} is unreadable in the prompt "
                "store (the server log names the file); register a new version or ask the operator to restore it"
            )
        return meta

    def versions(self, tenant: str, task: str) -> list[PromptMeta]:
        """Every live, readable version of a task, oldest first."""
        self._check_ids(tenant, task)
        task_dir = self._task_dir(tenant, task)
        if self._latest_meta(task_dir) is None:
            raise task_not_found(tenant, task)
        metas = (self._read_meta(path) for path in self._live_files(task_dir))
        return [m for m in metas if m is not None]

    def list(self, tenant: str | None = None) -> list[PromptMeta]:
        """The latest version of every live task, optionally of one tenant only."""
        tenants = None if tenant is None else [tenant]
        return sorted(self.snapshot(tenants).values(), key=lambda m: (m.tenant, m.task))

    def snapshot(self, tenants: Iterable[str] | None = None) -> dict[tuple[str, str], PromptMeta]:
        """Latest live, readable version of every task (of `tenants`, default all). Cheap to
        repeat: only new files are opened."""
        out: dict[tuple[str, str], PromptMeta] = {}
        tenant_dirs = self._subdirs(self.root) if tenants is None else [self.root / t for t in tenants if is_valid_id(t)]
        for tenant_dir in tenant_dirs:
            for task_dir in self._subdirs(tenant_dir):
                meta = self._latest_meta(task_dir)
                if meta is not None:
                    out[meta.key] = meta
        return out

    def latest_or_none(self, tenant: str, task: str) -> PromptMeta | None:
        """The task's latest live, readable version; None for a deleted or unknown task."""
        return self._latest_meta(self._task_dir(tenant, task)) if is_valid_id(tenant) and is_valid_id(task) else None

    def has_version_at_least(self, key: tuple[str, str], version: int) -> bool:
        """Whether a version file or tombstone numbered `version` or later exists for the task."""
        if not (is_valid_id(key[0]) and is_valid_id(key[1])):
            return True  # nothing to wait for
        entries = _version_entries(self._task_dir(*key), self._log_unreadable)
        return bool(entries) and entries[-1][0] >= version

    def claim_holder(self, task: str) -> str | None:
        """The tenant holding `task` in the global namespace, if any."""
        if not is_valid_id(task):
            return None
        path = self.root / _CLAIMS_DIR / task
        try:
            owner = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._log_unreadable(path, error)
            return None
        return owner if is_valid_id(owner) else None

    def published_claims(self) -> dict[str, str]:
        """Task id -> the tenant holding it in the global namespace."""
        claims_dir = self.root / _CLAIMS_DIR
        try:
            names = os.listdir(claims_dir)
        except FileNotFoundError:
            return {}
        except OSError as error:
            self._log_unreadable(claims_dir, error)
            return {}
        claims = {}
        for name in names:
            if not is_valid_id(name):
                continue  # temporary files
            try:
                owner = (claims_dir / name).read_text().strip()
            except FileNotFoundError:
                continue  # released while listing
            except OSError as error:
                self._log_unreadable(claims_dir / name, error)
                continue
            if is_valid_id(owner):
                claims[name] = owner
        return claims

    def namespace(self) -> TaskNamespace:
        """What every tenant's task references resolve to, as of now."""
        return TaskNamespace.build(self.snapshot(), self.published_claims())

    def resolve(self, tenant: str, ref: str) -> PromptMeta:
        """The version a tenant's request for `ref` (`task` or `owner/task`) uses; see
        prompts/namespace.py. Another tenant's private task answers exactly as an unknown one."""
        check_id("tenant", tenant, InvalidPromptError)
        owner, task = parse_task_ref(ref)
        claims = self.published_claims() if owner is None else {}
        candidates = {(owner or tenant, task)}
        if task in claims:
            candidates.add((claims[task], task))
        latest = {key: meta for key in candidates if (meta := self._latest_meta(self._task_dir(*key)))}
        return TaskNamespace.build(latest, claims).resolve(tenant, ref)

    # ---------------------------------------------------------------- validation
    def validate_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidPromptError(f"a prompt must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise InvalidPromptError(
                f"a prompt must be a 2-D [length, d_model] matrix, got shape {tuple(tensor.shape)}"
            )
        length, d_model = tensor.shape
        if d_model != self.d_model:
            raise InvalidPromptError(
                f"prompt d_model is {d_model}, but the served model's d_model is {self.d_model}; "
                "train or convert the prompt for this model"
            )
        if not 1 <= length <= self.max_length:
            raise InvalidPromptError(
                f"prompt length {length} is out of range; expected 1..{self.max_length} "
                "(store.max_prompt_length)"
            )
        if _dtype_name(tensor.dtype) not in SUPPORTED_DTYPES:
            raise InvalidPromptError(
                f"prompt dtype {tensor.dtype} is not supported; expected one of {sorted(SUPPORTED_DTYPES)}"
            )
        finite = torch.isfinite(tensor.float())
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise InvalidPromptError(
                f"prompt has non-finite values (NaN or Inf), first at row {bad[0]}, column {bad[1]}; "
                "a prompt must be finite"
            )
        return tensor.detach().cpu().contiguous()

    def _check_ids(self, tenant: str, task: str) -> None:
        check_id("tenant", tenant, InvalidPromptError)
        check_id("task", task, InvalidPromptError)

    def _check_tenant_allowed(self, tenant: str) -> None:
        if self.allowed_tenants is not None and tenant not in self.allowed_tenants:
            raise PermissionDeniedError(
                f"tenant {tenant!r} may not register prompts in this store; allowed tenants are "
                f"configured by the operator"
            )

    def _check_usage(self, tenant: str, own_rows: dict[str, int], rows: int, task: str, new_rows: int) -> int:
        """Quotas, with the tenant's lock held: usage as it would be after this registration.
        `own_rows` (task -> rows of its latest version) and `rows` come from the table caught up
        under the same lock (every earlier registration of the tenant finished under it and
        announced itself in the change log first, so the table sees all of them); this call's
        earlier items are added as they pass. Returns the tenant's rows after this one."""
        previous = own_rows.get(task)  # a new version replaces the task's latest
        prompts = len(own_rows) + (previous is None)
        rows += new_rows - (previous or 0)
        if previous is None or new_rows > previous:  # a version that grows nothing always fits
            self.quotas.check_usage(tenant, prompts=prompts, rows=rows)
        own_rows[task] = new_rows
        return rows

    # ---------------------------------------------------------------- the global namespace
    def _claim(self, task: str, tenant: str) -> None:
        claims_dir = self.root / _CLAIMS_DIR
        claims_dir.mkdir(exist_ok=True)
        if _publish(claims_dir, task, tenant.encode()):
            return
        holder = self.published_claims().get(task)
        if holder == tenant:
            return
        raise AlreadyExistsError(
            f"task id {task!r} is already published in the global namespace by tenant {holder!r}; "
            f"tenants calling {task!r} by its bare id keep reaching that prompt, so it cannot be taken over. "
            f"Register under another task id, share it without publishing (callers then name it "
            f"'{tenant}/{task}'), or have {holder!r}'s task deleted first"
        )

    def _release_claim(self, task: str, tenant: str) -> bool:
        if self.claim_holder(task) == tenant:
            (self.root / _CLAIMS_DIR / task).unlink(missing_ok=True)
            fsync_directory(self.root / _CLAIMS_DIR)
            return True
        return False

    @contextmanager
    def _tenant_lock(self, tenant: str) -> Iterator[None]:
        tenant_dir = self.root / tenant
        tenant_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(tenant_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ---------------------------------------------------------------- internals
    def _task_dir(self, tenant: str, task: str) -> Path:
        return self.root / tenant / task

    def _live_files(self, task_dir: Path) -> list[Path]:
        """Version files above the newest tombstone, oldest first (everything below it is deleted)."""
        live: list[Path] = []
        for _, path in reversed(_version_entries(task_dir, self._log_unreadable)):
            if path.suffix == ".deleted" or self._marker(path):
                break
            live.append(path)
        live.reverse()
        return live

    def _marker(self, path: Path) -> bool:
        known = self._is_marker.get(path)
        if known is None:
            try:
                known = path.stat().st_size == len(_DELETED)
            except FileNotFoundError:
                return False  # a store edited by hand: reading it will say so
            except OSError as error:
                self._log_unreadable(path, error)
                return False
            self._is_marker[path] = known
        return known

    def _latest_meta(self, task_dir: Path) -> PromptMeta | None:
        """The newest live version that reads cleanly; None for a deleted or unknown task."""
        for path in reversed(self._live_files(task_dir)):
            meta = self._read_meta(path)
            if meta is not None:
                return meta
            if self._is_marker.get(path):
                return None  # deleted since the listing: the versions below it are deleted too
        return None

    def _version_file(self, tenant: str, task: str, version: int | None) -> Path:
        self._check_ids(tenant, task)
        task_dir = self._task_dir(tenant, task)
        latest = self._latest_meta(task_dir)
        if latest is None:
            raise task_not_found(tenant, task)
        if version is None:
            return task_dir / f"v{latest.version:08d}.safetensors"
        path = task_dir / f"v{version:08d}.safetensors"
        if path not in self._live_files(task_dir):
            raise TaskNotFoundError(
                f"task {task!r} of tenant {tenant!r} has no live version {version}; the latest is {latest.version}"
            )
        return path

    def _next_version(self, task_dir: Path) -> int:
        """The number a new version or tombstone of the task takes. Writers only: it also removes
        the task's temporary files left by a writer that crashed (an hour or more ago)."""
        entries = _version_entries(task_dir, on_temp=_remove_if_stale)
        return entries[-1][0] + 1 if entries else 1

    def _read_meta(self, path: Path) -> PromptMeta | None:
        """The version's metadata; None (logged once) if the file is unreadable or corrupt."""
        cached = self._meta_cache.get(path)
        if cached is not None:
            return cached
        if path in self._unreadable and self._unreadable[path] == _stamp(path):
            return None  # known bad and unchanged: already logged
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = PromptMeta.from_json(handle.metadata()[_META_KEY])
        except FileNotFoundError:
            return None  # a store edited by hand
        except _UNREADABLE as error:
            if _holds_marker(path):  # a delete replaced it after our listing: not corrupt
                self._is_marker[path] = True
                return None
            self._log_unreadable(path, error)
            return None
        self._unreadable.pop(path, None)
        self._meta_cache[path] = meta
        return meta

    def _meta_from_bytes(self, path: Path, data: bytes) -> PromptMeta:
        cached = self._meta_cache.get(path)
        if cached is None:
            header_len = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + header_len])
            cached = PromptMeta.from_json(header["__metadata__"][_META_KEY])
            self._meta_cache[path] = cached
        return cached

    def _log_unreadable(self, path: Path, error: BaseException) -> None:
        stamp = _stamp(path)
        if self._unreadable.get(path, ()) == stamp:
            return
        self._unreadable[path] = stamp
        log.warning("prompt store: skipping unreadable %s (%s: %s); restore or remove the file",
                    path, type(error).__name__, error)

    def _subdirs(self, path: Path) -> list[Path]:
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return []
        except OSError as error:
            self._log_unreadable(path, error)
            return []
        return sorted(path / name for name in names if is_valid_id(name) and (path / name).is_dir())

    def _remove_stale_temp_files(self) -> None:
        """At start-up: the change log's and the claims' leftovers. A task directory's are removed
        when the task is next written (`_next_version`), so start-up lists no task directory."""
        cutoff = time.time() - _STALE_TEMP_SECONDS
        self.changes.remove_stale_temp_files(cutoff)
        for temp in self.root.glob(f"{_CLAIMS_DIR}/.tmp-*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except OSError:
                pass


def _publish(directory: Path, name: str, payload: bytes) -> bool:
    """Atomically create `directory/name` with `payload`. False if the name is taken."""
    temp = directory / f".tmp-{uuid.uuid4().hex}"
    try:
        write_durably(temp, payload)
        try:
            os.link(temp, directory / name)
        except FileExistsError:
            return False
        fsync_directory(directory)
        return True
    finally:
        temp.unlink(missing_ok=True)


def _replace_with_marker(path: Path) -> bool:
    """Free a deleted version's bytes but keep its number taken. False if it was a marker already."""
    try:
        if path.stat().st_size == len(_DELETED):
            return False
    except FileNotFoundError:
        return False
    temp = path.parent / f".tmp-{uuid.uuid4().hex}"
    write_durably(temp, _DELETED)
    os.replace(temp, path)
    fsync_directory(path.parent)
    return True


def _holds_marker(path: Path) -> bool:
    try:
        return path.stat().st_size == len(_DELETED) and path.read_bytes() == _DELETED
    except OSError:
        return False


def _remove_if_stale(temp: Path) -> None:
    try:
        if temp.stat().st_mtime < time.time() - _STALE_TEMP_SECONDS:
            temp.unlink()
    except OSError:
        pass  # gone meanwhile, or not ours to remove: the next write tries again


def _version_entries(task_dir: Path, on_error=None, on_temp=None) -> list[tuple[int, Path]]:
    """(number, path) of every version file and tombstone, by number. `on_temp` is called with
    each temporary file's path."""
    try:
        names = os.listdir(task_dir)
    except FileNotFoundError:
        return []
    except OSError as error:
        if on_error is None:
            raise
        on_error(task_dir, error)
        return []
    entries = []
    for name in names:
        match = _VERSION_FILE.match(name)
        if match:
            entries.append((int(match.group(1)), task_dir / name))
        elif on_temp is not None and name.startswith(".tmp-"):
            on_temp(task_dir / name)
    entries.sort()
    return entries


def _stamp(path: Path) -> object:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
