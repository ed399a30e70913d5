"""The store's change log: one small, immutable file per sequence number.

    <root>/.changes/s00000000/000000000001.json   {"op": "register", "tenant": ..., "task": ..., "version": 3, ...}
    <root>/.changes/s00000000/000000000002.json   one entry per registration, delete or released claim
    <root>/.changes/snapshot-000000010000.json    every task's latest version as of entry 10,000

Why one file per entry, not appends to one file: several writer processes (replicas, the CLI)
share the store, possibly from different machines on a ReadWriteMany volume. `O_APPEND` is
not atomic across NFS clients, so two appends can interleave or overwrite each other. A whole
entry is instead written to a temporary file, fsynced, then hard-linked to its sequence
number, exactly as versions are: the link fails if another writer took that number, and the
writer tries the next one. Numbers are therefore dense (every writer starts from a number
that exists and links the first free one above it), an entry is never torn, and a reader
tails the log by opening the next number: one failed `open` when nothing changed.

An entry is written *before* the change it announces (intent first). A crash after the entry
and before the version leaves an entry whose file never appears: readers re-read the task, see
nothing newer, and keep checking it for a while (see task_table.py). A crash after the version
cannot lose it: its entry is already durable. Entries only name the task that changed; readers
re-read the task's directory, so an entry is idempotent and never disagrees with the files.

A batch registration (`PromptStore.register_many`) announces all its tasks in ONE entry
(`{"changes": [...], "time": ...}`): one fsynced file for the whole group instead of one per
task. A reader applies each change it names, in order, under the entry's number.

Entries are grouped in directories of `SEGMENT` so no directory grows past that. Snapshots
are written by readers now and then (task_table.py) so a starting replica reads one file
plus the entries after it instead of listing every task.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .durable_files import fsync_directory, write_durably

log = logging.getLogger(__name__)

CHANGES_DIR = ".changes"
SEGMENT = 10_000
_SNAPSHOT_PREFIX = "snapshot-"
_KEEP_SNAPSHOTS = 2


@dataclass(frozen=True)
class Change:
    seq: int
    op: str  # "register", "delete" or "claim" (a published id was released)
    tenant: str
    task: str
    version: int  # registrations: the version number the writer is about to take (it may take a later one);
    #               deletes: the tombstone's number. Readers wait for a version file >= this.
    time: float  # writer's clock, unix seconds

    def to_bytes(self) -> bytes:
        return json.dumps({"op": self.op, "tenant": self.tenant, "task": self.task,
                           "version": self.version, "time": self.time}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, seq: int, data: bytes) -> "Change":
        record = json.loads(data)
        return cls(seq=seq, op=str(record["op"]), tenant=str(record["tenant"]), task=str(record["task"]),
                   version=int(record["version"]), time=float(record["time"]))


class ChangeLog:
    def __init__(self, store_root: Path) -> None:
        self.dir = Path(store_root) / CHANGES_DIR
        self._head_hint = 0  # a sequence number known to exist (0: none known)
        self._append_lock = threading.Lock()  # threads of one process take numbers in turn, not by collision

    # ---------------------------------------------------------------- writing
    def append(self, op: str, tenant: str, task: str, version: int) -> int:
        """Durably add one entry; returns its sequence number."""
        return self.append_many([(op, tenant, task, version)])

    def append_many(self, changes: list[tuple[str, str, str, int]]) -> int:
        """Durably add ONE entry announcing every (op, tenant, task, version) in `changes`;
        returns its sequence number. A single change is written in the one-change format."""
        if not changes:
            raise ValueError("append_many needs at least one change")
        now = time.time()
        if len(changes) == 1:
            payload = Change(0, *changes[0], now).to_bytes()
        else:
            payload = json.dumps({"changes": [{"op": op, "tenant": tenant, "task": task, "version": version}
                                              for op, tenant, task, version in changes], "time": now},
                                 sort_keys=True).encode()
        self.dir.mkdir(exist_ok=True)
        temp = self.dir / f".tmp-{uuid.uuid4().hex}"
        try:
            write_durably(temp, payload)
            with self._append_lock:
                seq = max(self._head_hint, 0) or self.head()
                while True:
                    seq += 1
                    segment = self._segment_dir(seq)
                    try:
                        os.link(temp, segment / _entry_name(seq))
                        break
                    except FileNotFoundError:
                        segment.mkdir(exist_ok=True)
                        fsync_directory(self.dir)
                        seq -= 1  # retry the same number in the new segment
                    except FileExistsError:
                        continue
                self._head_hint = seq
            fsync_directory(segment)  # durable before the change it announces is made
            return seq
        finally:
            temp.unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading
    def read(self, seq: int) -> list[Change] | None:
        """The changes entry `seq` announces (one, or a batch's), or None if it does not exist (yet)."""
        try:
            data = (self._segment_dir(seq) / _entry_name(seq)).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _parse_entry(seq, data)
        except (ValueError, KeyError, TypeError) as error:
            # Cannot happen for a linked entry (written whole, fsynced); a disk fault or a hand edit.
            log.warning("change log: entry %d is unreadable (%s); the task table rescans the store to recover",
                        seq, error)
            return [Change(seq, "unreadable", "", "", 0, time.time())]

    def read_after(self, seq: int) -> Iterator[Change]:
        """The changes of entries seq+1, seq+2, ... up to the first entry that does not exist yet."""
        while True:
            changes = self.read(seq + 1)
            if changes is None:
                return
            seq += 1
            self._head_hint = max(self._head_hint, seq)
            yield from changes

    def head(self) -> int:
        """The highest sequence number written so far (0 if none): two directory listings."""
        try:
            segments = sorted(n for n in os.listdir(self.dir) if n.startswith("s") and n[1:].isdigit())
        except FileNotFoundError:
            return 0
        for segment in reversed(segments):
            numbers = [int(n[:-5]) for n in os.listdir(self.dir / segment) if n.endswith(".json") and n[:-5].isdigit()]
            if numbers:
                head = max(numbers)
                # A writer may have linked more since the listing: walk forward to the true end.
                while self.read(head + 1) is not None:
                    head += 1
                self._head_hint = max(self._head_hint, head)
                return head
        return 0

    # ---------------------------------------------------------------- snapshots
    def write_snapshot(self, seq: int, payload: dict) -> None:
        """Atomically publish a snapshot as of entry `seq` (another writer's for the same `seq` wins)."""
        self.dir.mkdir(exist_ok=True)
        temp = self.dir / f".tmp-{uuid.uuid4().hex}"
        try:
            write_durably(temp, json.dumps(payload, separators=(",", ":")).encode())
            try:
                os.link(temp, self.dir / f"{_SNAPSHOT_PREFIX}{seq:012d}.json")
            except FileExistsError:
                return
            fsync_directory(self.dir)
        finally:
            temp.unlink(missing_ok=True)
        for old in self._snapshot_paths()[:-_KEEP_SNAPSHOTS]:
            old.unlink(missing_ok=True)

    def latest_snapshot(self) -> tuple[int, dict] | None:
        """(seq, payload) of the newest readable snapshot, or None."""
        for path in reversed(self._snapshot_paths()):
            try:
                return int(path.name[len(_SNAPSHOT_PREFIX):-5]), json.loads(path.read_bytes())
            except FileNotFoundError:
                continue  # removed by a newer writer while listing
            except (OSError, ValueError) as error:
                log.warning("change log: skipping unreadable snapshot %s (%s)", path, error)
        return None

    def _snapshot_paths(self) -> list[Path]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(self.dir / n for n in names if n.startswith(_SNAPSHOT_PREFIX) and n.endswith(".json"))

    def remove_stale_temp_files(self, cutoff: float) -> None:
        for temp in self.dir.glob(".tmp-*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except OSError:
                pass

    def _segment_dir(self, seq: int) -> Path:
        return self.dir / f"s{seq // SEGMENT:08d}"


def _parse_entry(seq: int, data: bytes) -> list[Change]:
    record = json.loads(data)
    if "changes" not in record:
        return [Change.from_bytes(seq, data)]
    when = float(record["time"])
    return [Change(seq=seq, op=str(c["op"]), tenant=str(c["tenant"]), task=str(c["task"]),
                   version=int(c["version"]), time=when) for c in record["changes"]]


def _entry_name(seq: int) -> str:
    return f"{seq:012d}.json"
