"""The store's change log and the task table replicas keep current from it (no rescans)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from promptmux.prompts import store as store_module
from promptmux.prompts import task_table as task_table_module
from promptmux.prompts.change_log import CHANGES_DIR
from promptmux.prompts.errors import TaskNotFoundError
from promptmux.prompts.store import PromptStore

D = 8


def open_store(root, **kwargs) -> PromptStore:
    return PromptStore(root, d_model=D, max_length=8, **kwargs)


def prompt(rows=2, seed=0):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def assert_equals_scan(table, store: PromptStore) -> None:
    """The incremental table agrees with a full scan: latest versions, published ids, listings."""
    scan = store.namespace()
    assert table.latest == scan.latest
    assert table.published == scan.published
    for tenant in {t for t, _ in scan.latest} | {"nobody"}:
        assert table.callable_by(tenant) == scan.callable_by(tenant)


def churn(store: PromptStore, seed: int = 0) -> None:
    """Registrations, new versions, shares, publishes, deletes and re-registrations."""
    for i in range(12):
        store.register(f"t{i % 3}", f"task{i}", prompt(seed=seed + i), shared=i % 4 == 0)
    store.register("t0", "task0", prompt(rows=3, seed=seed + 99))  # a new version, now private
    store.register("admin", "pub", prompt(seed=seed + 1), publish=True, check_quotas=False)
    store.register("t1", "pub", prompt(seed=seed + 2))  # t1's own 'pub' shadows the published one
    store.delete("t2", "task2")
    store.delete("admin", "pub")  # releases the claim
    store.register("t1", "pub2", prompt(seed=seed + 3), publish=True)
    store.delete("t1", "task4")
    store.register("t1", "task4", prompt(seed=seed + 4))  # re-registered after its delete


def test_a_replica_keeps_current_by_applying_only_new_changes(tmp_path):
    writer, replica = open_store(tmp_path), open_store(tmp_path)
    index = replica.tasks  # what a replica's engine resolves against
    index.refresh()
    assert len(index) == 0
    churn(writer)
    scans = replica.tasks.stats["full_scans"]
    applied = index.refresh()
    assert applied == writer.changes.head() > 0
    assert replica.tasks.stats["full_scans"] == scans  # applied, not rescanned
    assert_equals_scan(replica.tasks, replica)
    assert index.namespace.resolve("t3", "pub2").tenant == "t1"  # published
    assert index.namespace.resolve("t1", "pub").tenant == "t1"  # its own wins the bare id
    with pytest.raises(TaskNotFoundError):
        index.namespace.resolve("t2", "task2")  # deleted
    assert index.refresh() == 0  # idle: nothing to apply

    writer.register("t0", "late", prompt(seed=7))
    assert index.refresh() == 1
    assert index.namespace.resolve("t0", "late").version == 1


def test_a_restarted_replica_loads_the_snapshot_and_the_entries_after_it(tmp_path):
    first = open_store(tmp_path, snapshot_every=5)
    first.tasks.catch_up()
    churn(first)
    first.tasks.catch_up()  # past 5 new entries: writes a snapshot
    assert first.tasks.stats["snapshots_written"] >= 2  # the empty store's, then this one
    first.register("t9", "after-snapshot", prompt(seed=5))
    first.delete("t0", "task3")

    restarted = open_store(tmp_path, snapshot_every=5)
    restarted.snapshot = None  # a restart must not scan the store: calling it would fail
    restarted.tasks.catch_up()
    assert restarted.tasks.stats["full_scans"] == 0
    assert 0 < restarted.tasks.stats["snapshot_loaded"] < restarted.tasks.applied
    del restarted.snapshot
    assert_equals_scan(restarted.tasks, restarted)


def test_a_store_without_a_change_log_is_scanned_once_then_snapshotted(tmp_path):
    old = open_store(tmp_path)
    churn(old)
    shutil.rmtree(tmp_path / CHANGES_DIR)  # as written before the change log existed
    upgraded = open_store(tmp_path)
    upgraded.tasks.catch_up()
    assert upgraded.tasks.stats["full_scans"] == 1
    assert_equals_scan(upgraded.tasks, upgraded)
    again = open_store(tmp_path)
    again.tasks.catch_up()
    assert again.tasks.stats["full_scans"] == 0
    assert_equals_scan(again.tasks, again)


def test_an_entry_whose_version_is_not_written_yet_is_picked_up_when_it_lands(tmp_path, monkeypatch):
    """Entries are written before the version: a reader between the two waits for the file."""
    writer, replica = open_store(tmp_path), open_store(tmp_path)
    replica.tasks.catch_up()
    entry_written, release = threading.Event(), threading.Event()
    real_publish = store_module._publish

    def slow_publish(directory, name, payload):
        if name.startswith("v"):
            entry_written.set()
            release.wait(10)
        return real_publish(directory, name, payload)

    monkeypatch.setattr(store_module, "_publish", slow_publish)
    registering = threading.Thread(target=writer.register, args=("acme", "slow", prompt()))
    registering.start()
    assert entry_written.wait(10)
    assert replica.tasks.catch_up() == 1
    assert ("acme", "slow") not in replica.tasks.latest  # announced, not written yet
    release.set()
    registering.join(10)
    assert replica.tasks.catch_up("acme") == 0  # no new entry, but the awaited version landed
    assert replica.tasks.latest[("acme", "slow")].version == 1


def test_a_writer_killed_between_entry_and_version_loses_nothing_and_is_not_waited_for_forever(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    store.register("acme", "a", prompt(seed=1))
    child = textwrap.dedent(
        f"""
        import os, torch
        from promptmux.prompts import store as store_module
        from promptmux.prompts.store import PromptStore
        real_append = store_module.ChangeLog.append_many
        def append_then_die(self, *args):
            real_append(self, *args)
            os._exit(17)  # after the entry, before the version
        store_module.ChangeLog.append_many = append_then_die
        PromptStore({str(tmp_path)!r}, d_model={D}, max_length=8).register("acme", "a", torch.ones(2, {D}))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stderr
    replica = open_store(tmp_path)
    replica.tasks.catch_up()
    assert replica.tasks.latest[("acme", "a")].version == 1  # version 1 stays; version 2 never existed
    assert ("acme", "a") in replica.tasks._pending
    monkeypatch.setattr(task_table_module, "PENDING_GRACE_S", 0.0)
    replica.tasks.catch_up("acme")
    assert not replica.tasks._pending
    assert store.register("acme", "a", prompt(seed=2)).version == 2  # the number was never taken
    replica.tasks.catch_up()
    assert replica.tasks.latest[("acme", "a")].version == 2


def test_registrations_from_two_processes_interleave_in_one_dense_log(tmp_path):
    """Two processes register (and delete) at once while a replica catches up in between."""
    worker = textwrap.dedent(
        f"""
        import sys, torch
        from promptmux.prompts.store import PromptStore
        torch.set_num_threads(1)
        name = sys.argv[1]
        store = PromptStore({str(tmp_path)!r}, d_model={D}, max_length=8)
        for i in range(40):
            store.register("acme", f"{{name}}-{{i % 25}}", torch.full((2, {D}), float(i)))
            store.register("acme", "both", torch.full((1, {D}), float(i)))
            if i % 10 == 9:
                store.delete("acme", f"{{name}}-{{i % 25}}")
        """
    )
    replica = open_store(tmp_path)
    replica.tasks.catch_up()
    children = [subprocess.Popen([sys.executable, "-c", worker, name]) for name in ("p", "q")]
    seen = 0
    while any(c.poll() is None for c in children):
        seen += replica.tasks.catch_up()  # racing the writers
    assert all(c.wait(120) == 0 for c in children)
    seen += replica.tasks.catch_up("acme")  # and settle what was still in flight at the last one
    assert seen == replica.changes.head() == 2 * (40 + 40 + 4)  # every entry once, numbers dense
    assert_equals_scan(replica.tasks, replica)
    fresh = open_store(tmp_path)
    fresh.tasks.catch_up()
    assert_equals_scan(fresh.tasks, fresh)


def test_quotas_count_from_the_table_and_see_other_writers(tmp_path):
    from promptmux.prompts.errors import QuotaExceededError
    from promptmux.prompts.quotas import StoreQuotas

    quotas = StoreQuotas(max_prompts_per_tenant=3, max_rows_per_tenant=7)
    a, b = open_store(tmp_path, quotas=quotas), open_store(tmp_path, quotas=quotas)
    a.register("acme", "x", prompt(rows=2))
    b.register("acme", "y", prompt(rows=2))
    with pytest.raises(QuotaExceededError, match="rows"):
        a.register("acme", "z", prompt(rows=4))  # 2 + 2 + 4 > 7, counting b's registration
    a.register("acme", "z", prompt(rows=3))
    with pytest.raises(QuotaExceededError, match="prompts"):
        b.register("acme", "w", prompt(rows=1))
    a.delete("acme", "x")
    b.register("acme", "w", prompt(rows=1))  # sees a's delete
    b.register("acme", "w", prompt(rows=1))  # a new version of a task counts once


def test_an_idle_catch_up_lists_no_directory(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    churn(store)
    store.tasks.catch_up()
    calls = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda *a: calls.append(a) or real_listdir(*a))
    for _ in range(20):
        assert store.tasks.catch_up() == 0
    assert calls == []


def test_register_many_stores_a_group_under_one_entry_and_fails_items_alone(tmp_path):
    from promptmux.prompts.errors import AlreadyExistsError, InvalidPromptError, QuotaExceededError
    from promptmux.prompts.quotas import StoreQuotas
    from promptmux.prompts.records import Registration

    store = open_store(tmp_path, quotas=StoreQuotas(max_prompts_per_tenant=3, max_rows_per_tenant=100))
    replica = open_store(tmp_path)
    store.register("admin", "taken", prompt(), publish=True, check_quotas=False)
    replica.tasks.catch_up()
    head = store.changes.head()
    nan = prompt()
    nan[1, 2] = float("nan")
    outcomes = store.register_many([
        Registration("acme", "a", prompt(seed=1)),
        Registration("acme", "bad", nan),                            # not finite
        Registration("globex", "b", prompt(rows=3, seed=2), shared=True),
        Registration("acme", "a", prompt(seed=3)),                   # the same task twice in one call
        Registration("acme", "c", prompt(seed=4)),
        Registration("acme", "d", prompt(seed=5)),
        Registration("acme", "e", prompt(seed=6)),                   # acme's 4th prompt: over its quota of 3
        Registration("globex", "taken", prompt(seed=7), publish=True),  # another tenant holds the id
    ])
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["PromptMeta", "InvalidPromptError", "PromptMeta", "InvalidPromptError", "PromptMeta",
                     "PromptMeta", "QuotaExceededError", "AlreadyExistsError"]
    assert isinstance(outcomes[1], InvalidPromptError) and "row 1, column 2" in str(outcomes[1])
    assert isinstance(outcomes[3], InvalidPromptError) and "more than once" in str(outcomes[3])
    assert isinstance(outcomes[6], QuotaExceededError) and "4 prompts" in str(outcomes[6])
    assert isinstance(outcomes[7], AlreadyExistsError)
    assert store.changes.head() == head + 1  # one entry for the whole group
    assert [c.task for c in store.changes.read(head + 1)] == ["a", "b", "c", "d"]
    assert replica.tasks.catch_up() == 4
    assert_equals_scan(replica.tasks, replica)
    assert torch.equal(replica.get("acme", "a").tensor, prompt(seed=1))
    assert replica.latest_or_none("globex", "b").shared
    restarted = open_store(tmp_path)  # durable: a new process sees the same
    restarted.tasks.catch_up()
    assert_equals_scan(restarted.tasks, restarted)


def test_a_group_entry_counts_each_change_toward_the_next_snapshot(tmp_path):
    from promptmux.prompts.records import Registration

    store = open_store(tmp_path, snapshot_every=5)
    store.tasks.catch_up()
    written = store.tasks.stats["snapshots_written"]
    store.register_many([Registration("acme", f"t{i}", prompt(seed=i)) for i in range(6)])  # one entry, 6 changes
    store.tasks.catch_up()
    assert store.tasks.stats["snapshots_written"] == written + 1
    restarted = open_store(tmp_path)
    restarted.tasks.catch_up()
    assert restarted.tasks.stats["snapshot_loaded"] == store.changes.head()  # nothing left to replay
    assert_equals_scan(restarted.tasks, restarted)


def test_compaction_drops_entries_below_the_older_snapshot_and_a_replica_behind_it_reloads(tmp_path, monkeypatch):
    from promptmux.prompts import change_log as change_log_module

    monkeypatch.setattr(change_log_module, "SEGMENT", 4)
    writer = open_store(tmp_path, snapshot_every=6)
    lagging = open_store(tmp_path, snapshot_every=0)  # never snapshots itself
    writer.register("acme", "first", prompt(seed=1))
    lagging.tasks.catch_up()
    assert lagging.tasks.applied == 1
    for i in range(30):
        writer.register(f"t{i % 3}", f"task{i % 11}", prompt(seed=i))
        if i == 20:
            writer.delete("t1", "task1")
        writer.tasks.catch_up()  # the writer's table snapshots every 6 changes and compacts
    changes_dir = tmp_path / CHANGES_DIR
    floor = writer.changes.compacted_through()
    assert floor >= 8 and (floor + 1) % 4 == 0  # whole segments only
    assert not (changes_dir / "s00000000").exists()
    assert len(list(changes_dir.glob("snapshot-*.json"))) == 2
    kept = sorted(int(p.name[9:-5]) for p in changes_dir.glob("snapshot-*.json"))
    assert floor <= kept[0]  # nothing a reader of either snapshot needs is gone
    assert all(writer.changes.read(seq) is not None for seq in range(floor + 1, writer.changes.head() + 1))
    # The lagging replica's next entry is gone: it reloads the newest snapshot and ends current.
    lagging.tasks.catch_up()
    assert lagging.tasks.stats["reloads"] == 1
    assert lagging.tasks.applied == writer.changes.head()
    assert_equals_scan(lagging.tasks, lagging)
    # A writer whose idea of the head points into the removed entries takes a fresh number.
    stale = open_store(tmp_path)
    stale.changes._head_hint = 1
    head = writer.changes.head()
    stale.register("acme", "late", prompt(seed=99))
    assert stale.changes.head() == head + 1
    assert not (changes_dir / "s00000000").exists()  # no removed number was taken again
    lagging.tasks.catch_up()
    assert lagging.tasks.latest[("acme", "late")].version == 1
    restarted = open_store(tmp_path)
    restarted.tasks.catch_up()
    assert_equals_scan(restarted.tasks, restarted)


def test_groups_from_two_processes_over_the_same_tenants_interleave_without_deadlock(tmp_path):
    """Two processes register groups spanning the same tenants (each takes the owners' locks in
    one order), singles and deletes, while a replica catches up in between."""
    worker = textwrap.dedent(
        f"""
        import sys, torch
        from promptmux.prompts.records import Registration
        from promptmux.prompts.store import PromptStore
        torch.set_num_threads(1)
        name = sys.argv[1]
        tenants = ["acme", "globex", "initech"] if name == "p" else ["initech", "globex", "acme"]
        store = PromptStore({str(tmp_path)!r}, d_model={D}, max_length=8)
        for i in range(15):
            group = [Registration(t, f"{{name}}-{{i % 6}}-{{t}}", torch.full((2, {D}), float(i))) for t in tenants]
            group.append(Registration("acme", "both", torch.full((1, {D}), float(i))))
            assert all(not isinstance(o, Exception) for o in store.register_many(group))
            if i % 5 == 4:
                store.delete("globex", f"{{name}}-{{i % 6}}-globex")
        """
    )
    replica = open_store(tmp_path)
    replica.tasks.catch_up()
    children = [subprocess.Popen([sys.executable, "-c", worker, name]) for name in ("p", "q")]
    while any(c.poll() is None for c in children):
        replica.tasks.catch_up()
    assert all(c.wait(120) == 0 for c in children)
    replica.tasks.catch_up("acme")
    replica.tasks.catch_up("globex")
    assert replica.changes.head() == 2 * (15 + 3)  # one entry per group, one per delete: dense
    assert replica.tasks.latest[("acme", "both")].version == 30  # every group's version of it, none lost
    assert_equals_scan(replica.tasks, replica)
    fresh = open_store(tmp_path)
    fresh.tasks.catch_up()
    assert_equals_scan(fresh.tasks, fresh)


def test_a_snapshot_of_the_earlier_format_one_object_per_task_still_loads(tmp_path):
    from dataclasses import asdict

    writer = open_store(tmp_path)
    churn(writer)
    writer.tasks.catch_up()
    old_format = {"format": 1, "metas": [asdict(m) for m in writer.tasks.latest.values()],
                  "claims": writer.published_claims(), "pending": []}
    for snapshot in (tmp_path / CHANGES_DIR).glob("snapshot-*.json"):
        snapshot.unlink()
    writer.changes.write_snapshot(writer.changes.head(), old_format)  # as an earlier release wrote it
    replica = open_store(tmp_path)
    replica.tasks.catch_up()
    assert replica.tasks.stats["full_scans"] == 0 and replica.tasks.stats["snapshot_loaded"] == writer.changes.head()
    assert_equals_scan(replica.tasks, replica)


def test_reconciliation_picks_up_a_writer_that_logs_nothing_and_is_off_by_default(tmp_path, monkeypatch):
    watched = open_store(tmp_path, reconcile_interval_s=0.01)
    default = open_store(tmp_path)
    old_writer = open_store(tmp_path)
    old_writer.register("acme", "logged", prompt(seed=1))
    watched_index, default_index = watched.tasks, default.tasks
    watched_index.refresh()
    default_index.refresh()
    assert watched.tasks.latest[("acme", "logged")].version == 1
    monkeypatch.setattr(old_writer.changes, "append_many", lambda changes: 0)  # a writer that logs nothing
    old_writer.register("acme", "silent", prompt(seed=2))
    old_writer.register("acme", "logged", prompt(seed=3))  # a new version, unlogged
    old_writer.register("admin", "silent-pub", prompt(seed=4), publish=True, check_quotas=False)
    time.sleep(0.02)
    watched_index.refresh()
    default_index.refresh()
    assert ("acme", "silent") not in default.tasks.latest  # the change log alone does not see it
    assert default.tasks.latest[("acme", "logged")].version == 1
    assert watched.tasks.stats["reconciled_tasks"] == 4  # silent, logged v2, silent-pub and its published id
    assert watched.tasks.latest[("acme", "logged")].version == 2
    assert_equals_scan(watched.tasks, watched)
    rounds = watched.tasks.stats["reconciliations"]
    time.sleep(0.02)
    watched_index.refresh()  # another round finds nothing new to fix
    assert watched.tasks.stats["reconciliations"] == rounds + 1 and watched.tasks.stats["reconciled_tasks"] == 4
