"""Durable prompt store, keyed by (tenant, task), with immutable versions.

Layout on disk (works on a local disk and on a shared ReadWriteMany volume):

    <root>/<tenant>/<task>/v00000001.safetensors   one immutable version each
    <root>/<tenant>/<task>/v00000002.deleted       a tombstone: the task was deleted

A version appears atomically: it is written to a temporary file, fsynced, then hard-linked
to its final name. The link fails if another writer took that version number, so
concurrent registrations never overwrite each other, and a crash mid-write leaves only an
ignored temporary file. Version numbers never restart, so a task deleted and registered
again never reuses a version, and caches keyed by version stay valid.
"""
from __future__ import annotations

import json
import os
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from promptmux.serving.errors import InvalidPromptError, PermissionDeniedError, TaskNotFoundError

from .records import SUPPORTED_DTYPES, PromptMeta, StoredPrompt, content_hash

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_FILE = re.compile(r"^v(\d{8})\.(safetensors|deleted)$")
_TENSOR_KEY = "prompt"
_META_KEY = "promptmux"
_STALE_TEMP_SECONDS = 3600


class PromptStore:
    def __init__(
        self,
        root: str | Path,
        *,
        d_model: int,
        max_length: int,
        allowed_tenants: Iterable[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.d_model = d_model
        self.max_length = max_length
        self.allowed_tenants = None if allowed_tenants is None else frozenset(allowed_tenants)
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta_cache: dict[Path, PromptMeta] = {}  # immutable versions: never invalidated
        self._remove_stale_temp_files()

    # ---------------------------------------------------------------- writes
    def register(
        self,
        tenant: str,
        task: str,
        tensor: torch.Tensor,
        *,
        shared: bool = False,
        description: str = "",
        extra: dict | None = None,
    ) -> PromptMeta:
        """Validate and store a new version; returns its metadata."""
        self._check_ids(tenant, task)
        self._check_tenant_allowed(tenant)
        tensor = self.validate_tensor(tensor)
        task_dir = self._task_dir(tenant, task)
        task_dir.mkdir(parents=True, exist_ok=True)
        while True:
            version = self._next_version(task_dir)
            meta = PromptMeta(
                tenant=tenant,
                task=task,
                version=version,
                content_hash=content_hash(tensor),
                d_model=int(tensor.shape[1]),
                length=int(tensor.shape[0]),
                dtype=_dtype_name(tensor.dtype),
                created_at=time.time(),
                shared=shared,
                description=description,
                extra=dict(extra or {}),
            )
            payload = st_save({_TENSOR_KEY: tensor}, metadata={_META_KEY: meta.to_json()})
            if _publish(task_dir, f"v{version:08d}.safetensors", payload):
                return meta
            # Another writer took this version number first: take the next one.

    def delete(self, tenant: str, task: str) -> int:
        """Delete a task (every version). Returns how many versions were removed."""
        self._check_ids(tenant, task)
        current = self._latest_file(tenant, task)
        if current is None:
            raise self._not_found(tenant, task)
        task_dir = current.parent
        while not _publish(task_dir, f"v{self._next_version(task_dir):08d}.deleted", b""):
            pass
        removed = 0
        for path in task_dir.glob("v*.safetensors"):
            path.unlink(missing_ok=True)
            self._meta_cache.pop(path, None)
            removed += 1
        return removed

    # ---------------------------------------------------------------- reads
    def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrompt:
        path = self._version_file(tenant, task, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted between listing and reading
            raise self._not_found(tenant, task) from None
        tensors = st_load(data)
        meta = self._meta_from_bytes(path, data)
        return StoredPrompt(meta=meta, tensor=tensors[_TENSOR_KEY])

    def meta(self, tenant: str, task: str, version: int | None = None) -> PromptMeta:
        return self._read_meta(self._version_file(tenant, task, version))

    def versions(self, tenant: str, task: str) -> list[PromptMeta]:
        """Every live version of a task, oldest first."""
        self._check_ids(tenant, task)
        if self._latest_file(tenant, task) is None:
            raise self._not_found(tenant, task)
        entries = _version_entries(self._task_dir(tenant, task))
        return [self._read_meta(path) for _, path in entries if path.suffix == ".safetensors"]

    def list(self, tenant: str | None = None) -> list[PromptMeta]:
        """The latest version of every live task, optionally of one tenant only."""
        return sorted(
            (m for m in self.snapshot().values() if tenant is None or m.tenant == tenant),
            key=lambda m: (m.tenant, m.task),
        )

    def snapshot(self) -> dict[tuple[str, str], PromptMeta]:
        """Latest live version of every task. Cheap to repeat: only new files are opened."""
        out: dict[tuple[str, str], PromptMeta] = {}
        for tenant_dir in _subdirs(self.root):
            for task_dir in _subdirs(tenant_dir):
                entries = _version_entries(task_dir)
                if entries and entries[-1][1].suffix == ".safetensors":
                    try:
                        meta = self._read_meta(entries[-1][1])
                    except FileNotFoundError:
                        continue  # deleted while listing
                    out[meta.key] = meta
        return out

    def resolve(self, tenant: str, task: str) -> PromptMeta:
        """The version a tenant's request for `task` uses: its own task, else a shared one.

        Another tenant's private task answers exactly as an unknown task does."""
        self._check_ids(tenant, task)
        own = self._latest_file(tenant, task)
        if own is not None:
            return self._read_meta(own)
        for tenant_dir in _subdirs(self.root):
            other = self._latest_file(tenant_dir.name, task)
            if other is not None:
                meta = self._read_meta(other)
                if meta.shared:
                    return meta
        raise self._not_found(tenant, task)

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
        for kind, value in (("tenant", tenant), ("task", task)):
            if not isinstance(value, str) or not ID_PATTERN.match(value):
                raise InvalidPromptError(
                    f"invalid {kind} id {value!r}: expected 1-128 characters of letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit"
                )

    def _check_tenant_allowed(self, tenant: str) -> None:
        if self.allowed_tenants is not None and tenant not in self.allowed_tenants:
            raise PermissionDeniedError(
                f"tenant {tenant!r} may not register prompts in this store; allowed tenants are "
                f"configured by the operator"
            )

    def _not_found(self, tenant: str, task: str) -> TaskNotFoundError:
        return TaskNotFoundError(
            f"unknown task {task!r} for tenant {tenant!r}; register its prompt first "
            "(promptmux prompts import) or list tasks with `promptmux prompts list`"
        )

    # ---------------------------------------------------------------- internals
    def _task_dir(self, tenant: str, task: str) -> Path:
        return self.root / tenant / task

    def _latest_file(self, tenant: str, task: str) -> Path | None:
        entries = _version_entries(self._task_dir(tenant, task))
        if not entries or entries[-1][1].suffix != ".safetensors":
            return None
        return entries[-1][1]

    def _version_file(self, tenant: str, task: str, version: int | None) -> Path:
        self._check_ids(tenant, task)
        latest = self._latest_file(tenant, task)
        if latest is None:
            raise self._not_found(tenant, task)
        if version is None:
            return latest
        path = latest.parent / f"v{version:08d}.safetensors"
        if not path.exists():
            raise TaskNotFoundError(
                f"task {task!r} of tenant {tenant!r} has no live version {version}; "
                f"the latest is {int(latest.stem[1:])}"
            )
        return path

    def _next_version(self, task_dir: Path) -> int:
        entries = _version_entries(task_dir)
        return entries[-1][0] + 1 if entries else 1

    def _read_meta(self, path: Path) -> PromptMeta:
        cached = self._meta_cache.get(path)
        if cached is None:
            with safe_open(str(path), framework="pt") as handle:
                cached = PromptMeta.from_json(handle.metadata()[_META_KEY])
            self._meta_cache[path] = cached
        return cached

    def _meta_from_bytes(self, path: Path, data: bytes) -> PromptMeta:
        cached = self._meta_cache.get(path)
        if cached is None:
            header_len = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + header_len])
            cached = PromptMeta.from_json(header["__metadata__"][_META_KEY])
            self._meta_cache[path] = cached
        return cached

    def _remove_stale_temp_files(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for temp in self.root.glob("*/*/.tmp-*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except FileNotFoundError:
                pass


def _publish(directory: Path, name: str, payload: bytes) -> bool:
    """Atomically create `directory/name` with `payload`. False if the name is taken."""
    temp = directory / f".tmp-{uuid.uuid4().hex}"
    try:
        _write_durably(temp, payload)
        try:
            os.link(temp, directory / name)
        except FileExistsError:
            return False
        _fsync_directory(directory)
        return True
    finally:
        temp.unlink(missing_ok=True)


def _write_durably(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version_entries(task_dir: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(task_dir)
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        match = _VERSION_FILE.match(name)
        if match:
            entries.append((int(match.group(1)), task_dir / name))
    entries.sort()
    return entries


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and ID_PATTERN.match(p.name))
    except FileNotFoundError:
        return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
