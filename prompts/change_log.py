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

Compaction: after a snapshot, the log keeps the two newest snapshots and drops every whole
segment of entries at or below the older one (`compact`), so the log's size stays bounded by
`snapshot_every_changes` entries, not by the store's history. First the number it drops
through is recorded (`compacted`, replaced atomically), then the segments go. A reader whose
next entry is gone and at or below that number has fallen behind: it reloads the newest
snapshot instead (task_table.py). A writer never takes a number at or below it.
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
_COMPACTED = "compacted"  # holds the number through which entries were removed


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
                        floor = self.compacted_through()
                        if seq <= floor:  # a stale hint into compacted entries: never reuse their numbers
                            seq = max(floor, self.head())
                            continue
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
        for segment in reversed(self._segment_names()):
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
        kept = self._snapshot_paths()
        for old in kept[:-_KEEP_SNAPSHOTS]:
            old.unlink(missing_ok=True)
        kept = kept[-_KEEP_SNAPSHOTS:]
        if len(kept) == _KEEP_SNAPSHOTS:
            self.compact(int(kept[0].name[len(_SNAPSHOT_PREFIX):-5]))

    # ---------------------------------------------------------------- compaction
    def compact(self, through: int) -> int:
        """Remove every whole segment whose entries are all at or below `through` (a snapshot's
        number: every reader that loads it or a later one needs only entries after it). Returns
        how many entries were removed."""
        last_full_segment = (through + 1) // SEGMENT - 1  # the highest segment ending at or below `through`
        doomed = []
        for name in self._segment_names():
            number = int(name[1:])
            if number <= last_full_segment:
                doomed.append(name)
        if not doomed:
            return 0
        floor = (int(doomed[-1][1:]) + 1) * SEGMENT - 1
        if floor > self.compacted_through():
            temp = self.dir / f".tmp-{uuid.uuid4().hex}"
            write_durably(temp, str(floor).encode())
            os.replace(temp, self.dir / _COMPACTED)
            fsync_directory(self.dir)
        removed = 0
        for name in doomed:
            segment = self.dir / name
            try:
                entries = os.listdir(segment)
            except FileNotFoundError:
                continue  # another reader compacted it meanwhile
            for entry in entries:
                try:
                    (segment / entry).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            try:
                segment.rmdir()
            except OSError:
                pass  # another compactor's removal in progress; it finishes the job
        fsync_directory(self.dir)
        return removed

    def compacted_through(self) -> int:
        """Every entry at or below this number was removed by compaction (0: none)."""
        try:
            return int((self.dir / _COMPACTED).read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            log.warning("change log: %s is unreadable (%s); assuming nothing was compacted", self.dir / _COMPACTED,
                        error)
            return 0

    def fell_behind(self, applied: int) -> bool:
        """Whether entry `applied`+1 is gone to compaction (the reader must reload a snapshot).
        Cheap when it is not: one directory lookup, and the marker read only at a segment's start."""
        if self._segment_dir(applied + 1).is_dir():
            return False
        return applied + 1 <= self.compacted_through()

    def _segment_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.startswith("s") and n[1:].isdigit())
        except FileNotFoundError:
            return []

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
