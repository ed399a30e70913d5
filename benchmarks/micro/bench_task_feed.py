"""Keeping a replica's task index current: full rescans (before) against the change log (now).

One store of N tasks on local disk, registered through `PromptStore.register` (fsynced, with
quotas checked). Every figure is measured in this one run, on this machine, and reported
next to its counterpart as a ratio. Refresh and start-up figures are CPU time of the thread
doing them (a shared machine's load does not inflate them); registrations are wall time:

- refresh: a full rebuild of the index from the store listing (what every replica did every
  `store.refresh_interval_s` before the change log) against `catch_up` with nothing new, and
  with one new registration;
- idle CPU: a refresh thread at 0.5 s for a few seconds, its own CPU time over wall time;
- registration: `register` plus the index update the server does after it (a full rebuild
  before, `catch_up` now);
- start-up: a new process's index from a cold scan against one from the snapshot (at the
  head, and `snapshot_every_changes` entries behind it);
- a projection to 1,000,000 tasks from the per-task costs measured here.

    python -m promptmux.benchmarks.micro.bench_task_feed                 # 3,000 tasks, writes results/<date>-<machine>/micro/task_feed_cpu.md
    python -m promptmux.benchmarks.micro.bench_task_feed --tasks 500 --no-write
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from promptmux.prompts.namespace import TaskNamespace
from promptmux.prompts.quotas import StoreQuotas
from promptmux.prompts.store import PromptStore

from ..machine import dated_results_dir

RESULTS = dated_results_dir()
D_MODEL = 64
INTERVAL_S = 0.5


def open_store(root: Path, **kwargs) -> PromptStore:
    quotas = StoreQuotas(max_prompts_per_tenant=1_000_000, max_rows_per_tenant=1 << 40)
    return PromptStore(root, d_model=D_MODEL, max_length=128, quotas=quotas, **kwargs)


def fill(store: PromptStore, tasks: int, tenants: int) -> float:
    """Register `tasks` prompts of 20-100 rows over `tenants` tenants; returns seconds."""
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for i in tqdm(range(tasks), desc="registering", unit="task", leave=False):
        rows = int(torch.randint(20, 101, (1,), generator=gen))
        store.register(f"tenant{i % tenants}", f"task{i}", torch.randn(rows, D_MODEL, generator=gen),
                       shared=i % 10 == 0)
    return time.perf_counter() - started


def median_seconds(work, reps: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(reps):
        started = clock()
        work()
        times.append(clock() - started)
    return statistics.median(times)


def median_cpu_seconds(work, reps: int) -> float:
    """CPU time of this thread: other work on a shared machine does not inflate it."""
    return median_seconds(work, reps, clock=time.thread_time)


def full_rebuild(store: PromptStore) -> TaskNamespace:
    """What a replica did every refresh before the change log."""
    return TaskNamespace.build(store.snapshot(), store.published_claims())


def idle_cpu_fraction(refresh, seconds: float) -> float:
    """CPU time of a refresh thread at INTERVAL_S over its wall time."""
    stop = threading.Event()
    used = []

    def loop():
        started = time.thread_time()
        while not stop.wait(INTERVAL_S):
            refresh()
        used.append(time.thread_time() - started)

    thread = threading.Thread(target=loop)
    wall = time.perf_counter()
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return used[0] / (time.perf_counter() - wall)


def measure(tasks: int, tenants: int, idle_seconds: float) -> dict:
    out: dict = {"tasks": tasks, "tenants": tenants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        store = open_store(root, snapshot_every=0)  # snapshots written explicitly below
        out["fill_s"] = fill(store, tasks, tenants)
        behind = store.changes.head()  # a snapshot this far behind: the worst a replica starts from
        store.tasks.write_snapshot()  # the empty store's snapshot was at 0; this one is at the head

        # Start-up of a new process: a cold full scan against the snapshot.
        out["cold_scan_s"] = median_cpu_seconds(lambda: full_rebuild(open_store(root)), 3)
        out["cold_snapshot_s"] = median_cpu_seconds(lambda: open_store(root).tasks.catch_up(), 3)
        out["snapshot_behind_entries"] = behind

        # Refresh, warm: the old rebuild against catch_up (nothing new / one new registration).
        replica = open_store(root, snapshot_every=0)
        replica.tasks.catch_up()
        full_rebuild(replica)  # warm the meta cache, as a long-running replica's is
        out["rebuild_s"] = median_cpu_seconds(lambda: full_rebuild(replica), 5)
        out["idle_catch_up_s"] = median_cpu_seconds(replica.tasks.catch_up, 2000)
        writer = open_store(root, snapshot_every=0)
        one_change = []
        for i in range(20):
            writer.register("tenant0", f"extra{i}", torch.randn(20, D_MODEL))
            started = time.thread_time()
            assert replica.tasks.catch_up() == 1
            one_change.append(time.thread_time() - started)
        out["one_change_catch_up_s"] = statistics.median(one_change)

        # Registration as the server does it: register, then update this replica's index.
        def register_then(update, name):
            def work():
                replica.register("tenant1", f"{name}{time.perf_counter_ns()}", torch.randn(20, D_MODEL))
                update()
            return work

        out["register_rebuild_s"] = median_seconds(register_then(lambda: full_rebuild(replica), "a"), 10)
        out["register_catch_up_s"] = median_seconds(register_then(replica.tasks.catch_up, "b"), 10)

        # Idle CPU of the refresh thread, both ways.
        out["idle_cpu_rebuild"] = idle_cpu_fraction(lambda: full_rebuild(replica), idle_seconds)
        out["idle_cpu_catch_up"] = idle_cpu_fraction(replica.tasks.catch_up, idle_seconds)

        # Start-up from a snapshot `behind` entries old: the snapshot plus every entry since.
        for path in sorted((root / ".changes").glob("snapshot-*.json"))[1:]:
            path.unlink()  # keep only the empty store's snapshot, at 0
        out["cold_snapshot_behind_s"] = median_cpu_seconds(lambda: open_store(root).tasks.catch_up(), 1)
    return out


def report(m: dict, machine: str) -> str:
    n = m["tasks"]
    per_task = lambda s: s / n * 1e6  # noqa: E731
    million = 1_000_000
    lines = [
        f"# Keeping the task index current: full rescan against the change log ({machine})",
        "",
        f"{n:,} tasks of 20-100 rows over {m['tenants']} tenants, local disk, d_model={D_MODEL}; "
        f"refresh interval {INTERVAL_S} s. Refresh and start-up: CPU time; registration: wall time "
        "(fsync-bound). Measured in one run by `python -m promptmux.benchmarks.micro.bench_task_feed`.",
        "",
        "| what | before (full rescan) | now (change log) | ratio |",
        "|---|---|---|---|",
        f"| refresh, nothing changed | {m['rebuild_s'] * 1e3:.1f} ms ({per_task(m['rebuild_s']):.1f} µs/task) "
        f"| {m['idle_catch_up_s'] * 1e6:.1f} µs | {m['rebuild_s'] / m['idle_catch_up_s']:,.0f}x |",
        f"| refresh, one new version | {m['rebuild_s'] * 1e3:.1f} ms | {m['one_change_catch_up_s'] * 1e6:.0f} µs "
        f"| {m['rebuild_s'] / m['one_change_catch_up_s']:,.0f}x |",
        f"| idle replica's refresh thread, CPU | {m['idle_cpu_rebuild'] * 100:.2f}% of a core "
        f"| {m['idle_cpu_catch_up'] * 100:.3f}% of a core "
        f"| {m['idle_cpu_rebuild'] / max(m['idle_cpu_catch_up'], 1e-9):,.0f}x |",
        f"| one registration + index update | {m['register_rebuild_s'] * 1e3:.1f} ms "
        f"| {m['register_catch_up_s'] * 1e3:.2f} ms | {m['register_rebuild_s'] / m['register_catch_up_s']:.1f}x |",
        f"| start-up (new process) | cold scan {m['cold_scan_s']:.2f} s ({per_task(m['cold_scan_s']):.0f} µs/task) "
        f"| snapshot at head {m['cold_snapshot_s']:.3f} s ({per_task(m['cold_snapshot_s']):.1f} µs/task) "
        f"| {m['cold_scan_s'] / m['cold_snapshot_s']:.1f}x |",
        f"| start-up, snapshot {m['snapshot_behind_entries']:,} entries behind | cold scan {m['cold_scan_s']:.2f} s "
        f"| {m['cold_snapshot_behind_s']:.2f} s | {m['cold_scan_s'] / m['cold_snapshot_behind_s']:.1f}x |",
        "",
        f"Filling the store through `PromptStore.register` (one thread, fsynced, quotas checked): "
        f"{n / m['fill_s']:.0f} registrations/s.",
        "",
        "## Projection to 1,000,000 tasks (from the per-task costs above)",
        "",
        f"- Full rescan per refresh (before): {per_task(m['rebuild_s']) * million / 1e6:.1f} s of CPU every "
        f"{INTERVAL_S} s, i.e. more than a core; now an idle refresh stays {m['idle_catch_up_s'] * 1e6:.0f} µs "
        "(one failed open, independent of the task count).",
        f"- Start-up from a snapshot at the head: {per_task(m['cold_snapshot_s']) * million / 1e6:.1f} s; "
        f"plus up to `snapshot_every_changes` (10,000) entries at "
        f"{(m['cold_snapshot_behind_s'] - m['cold_snapshot_s']) / m['snapshot_behind_entries'] * 1e6:.0f} µs each "
        f"= {(m['cold_snapshot_behind_s'] - m['cold_snapshot_s']) / m['snapshot_behind_entries'] * 1e4:.1f} s. "
        f"A cold scan (before) would take {per_task(m['cold_scan_s']) * million / 1e6:.0f} s.",
        f"- A new version reaches every replica within one refresh interval ({INTERVAL_S} s) plus "
        f"{m['one_change_catch_up_s'] * 1e3:.2f} ms to apply it, independent of the task count.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--tenants", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--machine", default="2-core CPU", help="how to name this machine in the results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = report(measure(args.tasks, args.tenants, args.idle_seconds), args.machine)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "task_feed_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
