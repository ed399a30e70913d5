"""The store under abuse: bad ids, corrupt files, quotas, concurrent processes, SIGKILLs."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from promptmux.prompts.errors import (
    AlreadyExistsError,
    InvalidPromptError,
    InvalidRequestError,
    QuotaExceededError,
    StoredPromptUnreadableError,
    TaskNotFoundError,
)
from promptmux.prompts.ids import check_id, is_valid_id, parse_task_ref
from promptmux.prompts.quotas import StoreQuotas
from promptmux.prompts.records import content_hash
from promptmux.prompts.store import _DELETED as DELETED
from promptmux.prompts.store import PromptStore

D = 16
WORKER = str(Path(__file__).with_name("store_worker.py"))
BAD_IDS = ["copy\n", "copy\r", "c\u00f6py", "copy ", "", ".hidden", "a/b", "x" * 129, "\u0661"]


@pytest.fixture
def store(tmp_path):
    return PromptStore(tmp_path / "prompts", d_model=D, max_length=8)


def prompt(rows=4, seed=0):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def corrupt(path: Path, data: bytes = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json") -> None:
    path.chmod(0o644)
    path.write_bytes(data)


# ---------------------------------------------------------------------- ids
@pytest.mark.parametrize("bad", BAD_IDS)
def test_one_full_match_validator_refuses_every_bad_id_in_every_store_call(store, bad):
    assert not is_valid_id(bad)
    with pytest.raises(InvalidRequestError):
        check_id("task", bad)
    store.register("acme", "copy", prompt())
    for call in (
        lambda: store.register("acme", bad, prompt()),
        lambda: store.register(bad, "copy", prompt()),
        lambda: store.get("acme", bad),
        lambda: store.meta(bad, "copy"),
        lambda: store.versions("acme", bad),
        lambda: store.delete("acme", bad),
        lambda: store.resolve("acme", bad if "/" not in bad else "acme/" + bad),  # 'a/b' is a reference
    ):
        with pytest.raises(InvalidRequestError, match="invalid (task|tenant) (id|reference)"):
            call()
    assert [m.task for m in store.list()] == ["copy"]  # nothing was written under a bad id


def test_task_references_parse_in_full():
    assert parse_task_ref("summarize") == (None, "summarize")
    assert parse_task_ref("acme/summarize") == ("acme", "summarize")
    for bad in ["acme/", "/x", "a/b/c", "acme/copy\n", "acme\n/copy", "acme/c\u00f6py"]:
        with pytest.raises(InvalidRequestError, match="invalid task reference"):
            parse_task_ref(bad)


# ---------------------------------------------------------------------- sharing
def test_sharing_publishing_and_resolution(store):
    store.register("demo", "reverse", prompt(seed=1), publish=True)
    store.register("acme", "reverse", prompt(seed=2), shared=True)  # an ordinary share of a clashing id
    store.register("acme", "secret", prompt(seed=3))
    # A bare id: own task first, then the published one; never an ordinary tenant's share.
    assert store.resolve("globex", "reverse").tenant == "demo"
    assert store.resolve("acme", "reverse").tenant == "acme"
    assert store.resolve("globex", "acme/reverse").tenant == "acme"
    assert store.resolve("globex", "demo/reverse").tenant == "demo"
    with pytest.raises(TaskNotFoundError):
        store.resolve("globex", "acme/secret")
    # One publisher per id: a second is refused and changes nothing.
    with pytest.raises(AlreadyExistsError, match="already published .* by tenant 'demo'"):
        store.register("acme", "reverse", prompt(seed=4), publish=True)
    assert store.resolve("globex", "reverse").tenant == "demo"
    assert store.meta("acme", "reverse").version == 1
    names = dict(store.namespace().callable_by("globex"))
    assert {n: (m.tenant, m.task) for n, m in names.items()} == {
        "reverse": ("demo", "reverse"), "acme/reverse": ("acme", "reverse"),
    }
    mine = dict(store.namespace().callable_by("acme"))
    assert {n: m.tenant for n, m in mine.items()} == {"reverse": "acme", "secret": "acme", "demo/reverse": "demo"}
    # Deleting the publisher's task releases the id.
    store.delete("demo", "reverse")
    with pytest.raises(TaskNotFoundError):
        store.resolve("globex", "reverse")
    assert store.register("acme", "reverse", prompt(seed=5), publish=True).published
    assert store.resolve("globex", "reverse").tenant == "acme"


# ---------------------------------------------------------------------- corrupt files
def test_corrupt_and_unreadable_files_are_skipped_and_logged_once(store, caplog):
    store.register("acme", "a", prompt(seed=1))
    store.register("acme", "a", prompt(seed=2))
    store.register("acme", "b", prompt(seed=3))
    store.register("globex", "c", prompt(seed=4))
    bad_latest = store.root / "acme" / "a" / "v00000002.safetensors"
    bad_only = store.root / "acme" / "b" / "v00000001.safetensors"
    corrupt(bad_latest)
    corrupt(bad_only, b"")
    (store.root / "globex" / "c" / "v00000002.safetensors").mkdir()  # unreadable as a file
    caplog.set_level(logging.WARNING, logger="promptmux.prompts.store")
    fresh = PromptStore(store.root, d_model=D, max_length=8)  # what a starting replica does
    for _ in range(3):  # refreshes repeat the listing; each bad file is logged once
        listed = {(m.tenant, m.task): m.version for m in fresh.list()}
        assert listed == {("acme", "a"): 1, ("globex", "c"): 1}
        assert fresh.namespace().resolve("acme", "a").version == 1
    logged = [r.getMessage() for r in caplog.records]
    for path in (bad_latest, bad_only, store.root / "globex" / "c" / "v00000002.safetensors"):
        assert sum(str(path) in line for line in logged) == 1, (path, logged)
    assert torch.equal(fresh.get("acme", "a").tensor, prompt(seed=1))  # newest readable version
    with pytest.raises(StoredPromptUnreadableError, match="version 2 of task 'a'"):
        fresh.get("acme", "a", version=2)
    assert [m.version for m in fresh.versions("acme", "a")] == [1]
    # The owner can still replace or delete a task whose versions are all unreadable.
    assert fresh.register("acme", "b", prompt(seed=5)).version == 2
    assert fresh.delete("acme", "a") == 2
    # A file fixed in place is read again.
    corrupt(bad_only, (store.root / "acme" / "b" / "v00000002.safetensors").read_bytes())
    assert fresh.meta("acme", "b", version=1).task == "b"


# ---------------------------------------------------------------------- quotas
def test_each_quota_refuses_with_its_config_key_and_changes_nothing(tmp_path):
    quotas = StoreQuotas(max_prompts_per_tenant=2, max_rows_per_tenant=10, max_description_bytes=8)
    store = PromptStore(tmp_path, d_model=D, max_length=8, quotas=quotas)
    store.register("acme", "a", prompt(rows=4))
    store.register("acme", "b", prompt(rows=4))
    with pytest.raises(QuotaExceededError, match=r"store\.max_prompts_per_tenant") as err:
        store.register("acme", "c", prompt(rows=1))
    assert err.value.status == "RESOURCE_EXHAUSTED"
    with pytest.raises(QuotaExceededError, match=r"12 prompt rows .* quota of 10 \(store\.max_rows_per_tenant\)"):
        store.register("acme", "b", prompt(rows=8))
    with pytest.raises(QuotaExceededError, match=r"9 bytes exceeds .* 8 bytes \(store\.max_description_bytes\)"):
        store.register("acme", "a", prompt(), description="é" * 4 + "x")
    assert {m.task: (m.version, m.length) for m in store.list("acme")} == {"a": (1, 4), "b": (1, 4)}
    assert store.register("acme", "b", prompt(rows=6)).version == 2  # a new version replaces the old rows
    assert store.register("globex", "a", prompt()).version == 1  # quotas are per tenant
    store.delete("acme", "a")
    assert store.register("acme", "c", prompt(rows=4)).version == 1


def test_prompt_quota_is_exact_under_concurrent_processes(tmp_path):
    acks = tmp_path / "acks"
    worker = subprocess.run([sys.executable, WORKER, "fill", str(tmp_path / "s"), "acme", "25", str(acks), "3"],
                            timeout=120)
    assert worker.returncode == 0
    store = PromptStore(tmp_path / "s", d_model=D, max_length=8)
    assert len(store.list("acme")) == 25
    assert sorted(acks.read_text().split()) == sorted(m.task for m in store.list("acme"))


# ---------------------------------------------------------------------- races and crashes
def read_acks(path: Path) -> list[tuple[int, str]]:
    """Whole acknowledgement lines only: a child killed mid-line acknowledged nothing."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [(int(v), h) for v, h in (line.split() for line in lines)]


def deletion_markers(task_dir: Path) -> list[int]:
    """Numbers of tombstones and of deleted versions' files (the same marker bytes)."""
    return sorted(int(p.stem[1:]) for p in task_dir.glob("v*.safetensors") if p.read_bytes() == DELETED)


def test_delete_racing_register_in_two_processes_never_loses_a_newer_version(tmp_path):
    root, acks = tmp_path / "s", tmp_path / "acks"
    PromptStore(root, d_model=D, max_length=8).register("acme", "race", prompt())
    worker = subprocess.run([sys.executable, WORKER, "race", str(root), "acme", "race", "150", str(acks)], timeout=120)
    assert worker.returncode == 0
    acked = read_acks(acks)
    task_dir = root / "acme" / "race"
    markers = deletion_markers(task_dir)
    acked_versions = [v for v, _ in acked]
    # Tombstones: markers that are not acknowledged versions which a later tombstone deleted.
    deleted_at = sorted(set(markers) - set(acked_versions) - {1})
    assert len(acked) == 150 and len(deleted_at) >= 3, "the race needs both registrations and deletions"
    assert len(set(acked_versions)) == 150 and acked_versions == sorted(acked_versions)  # never a number twice
    assert not set(acked_versions) & set(deleted_at)
    store = PromptStore(root, d_model=D, max_length=8)
    for version, digest in acked:
        path = task_dir / f"v{version:08d}.safetensors"
        if any(t > version for t in deleted_at):
            assert path.read_bytes() == DELETED  # deleted by a later tombstone: bytes freed, number kept
        else:  # newer than every delete: intact
            stored = store.get("acme", "race", version)
            assert stored.meta.content_hash == digest == content_hash(stored.tensor)
    newer = [v for v in acked_versions if v > deleted_at[-1]]
    if newer:
        assert [m.version for m in store.versions("acme", "race")] == newer
    else:
        with pytest.raises(TaskNotFoundError):
            store.versions("acme", "race")
    assert store.register("acme", "race", prompt()).version == max(acked_versions + deleted_at) + 1
    assert_change_feed_matches_scan(root)


def test_sigkill_at_random_points_never_loses_an_acknowledged_version(tmp_path):
    """At least 50 registering children killed at random points; every acknowledged version
    stays intact, and the store stays readable and writable."""
    root, acks = tmp_path / "s", tmp_path / "acks"
    rng = random.Random(13)
    zygote = subprocess.Popen(
        [sys.executable, WORKER, "zygote", str(root), "acme", "crash", str(acks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    kills = 0
    try:
        deadline = time.monotonic() + 60
        while kills < 60 and time.monotonic() < deadline:
            zygote.stdin.write("fork\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            kills += 1
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert kills >= 50
    acked = read_acks(acks)
    assert len(acked) >= 20, "too few registrations finished to test anything"
    store = PromptStore(root, d_model=D, max_length=8)
    versions = store.versions("acme", "crash")
    live = {m.version: m.content_hash for m in versions}
    for version, digest in acked:
        assert live.get(version) == digest
        assert content_hash(store.get("acme", "crash", version).tensor) == digest
    assert len(live) == len(versions)  # every version file reads cleanly: none is torn
    assert store.register("acme", "crash", prompt()).version == max(live) + 1
    assert_change_feed_matches_scan(root)


def assert_change_feed_matches_scan(root: Path) -> None:
    """A replica starting now (snapshot + change log, no scan) sees exactly what a full scan sees."""
    fresh = PromptStore(root, d_model=D, max_length=8)
    fresh.tasks.catch_up()
    assert fresh.tasks.stats["full_scans"] == 0
    assert fresh.tasks.latest == fresh.snapshot()


def test_a_reader_that_listed_before_a_delete_reads_deleted_not_corrupt(tmp_path, monkeypatch, caplog):
    """A reader lists a task's versions, a delete lands, then the reader opens them: the
    marker bytes the delete left mean deleted, not a corrupt file, and no older version
    stands in for the deleted one."""
    writer = PromptStore(tmp_path, d_model=D, max_length=8)
    writer.register("acme", "x", torch.ones(2, D))
    writer.register("acme", "x", torch.zeros(2, D))
    reader = PromptStore(tmp_path, d_model=D, max_length=8)
    task_dir = reader._task_dir("acme", "x")
    listed = reader._live_files(task_dir)  # v1, v2: before the delete
    assert len(listed) == 2
    writer.delete("acme", "x")
    monkeypatch.setattr(reader, "_live_files", lambda _: listed)
    with caplog.at_level(logging.WARNING, logger="promptmux.prompts.store"):
        assert reader._latest_meta(task_dir) is None
    assert "unreadable" not in caplog.text
    assert all(path.read_bytes() == DELETED for path in listed)
