"""Many tasks on one deployment, through the API: registration rate, idle replica CPU, and
how fast a new version is live, with a projection to 1,000,000 tasks.

Starts the benchmark's own server (local_server.py: a private Ray cluster, one replica of the
embedded model), then registers N prompts of 20-100 rows through gRPC RegisterPrompt with
`--in-flight` calls outstanding, spread over `--tenants` tenants (an admin key registers for
each). Reported:

- the registration rate over each tenth of the run (sustained, not only the average) and
  over the whole run;
- the replica process's CPU while idle, before any registration and after all of them (the
  difference is what keeping N tasks current costs; the rest is Ray Serve's own upkeep);
- how long a version written by another process (straight into the store, as a second
  replica would) takes to be callable through this replica;
- a projection to 1,000,000 tasks from the measured per-task costs.

    python -m promptmux.benchmarks.bench_many_tasks --tasks 100000     # writes results/many_tasks_cpu.md
    python -m promptmux.benchmarks.bench_many_tasks --tasks 2000 --no-write
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .cpu_usage import snapshot, usage
from .local_server import ADMIN_TENANT, LocalServer

RESULTS = Path(__file__).parent / "results"
D_MODEL = 256  # the embedded model's width
TENANTS = 100


def app_args(tasks: int, tenants: int) -> dict:
    per_tenant = -(-tasks // tenants) + 10
    return {
        "model": {"source": "embedded"},
        "store": {"refresh_interval_s": 0.5, "max_prompt_length": 128, "max_prompts_per_tenant": per_tenant,
                  "max_rows_per_tenant": per_tenant * 100},
        "serving": {"torch_threads": 1},
    }


def prompt_tensors(tasks: int, seed: int = 0):
    """The benchmark's prompts: 20-100 rows each (uniform), small random values."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        rows = int(torch.randint(20, 101, (1,), generator=gen))
        yield 0.05 * torch.randn(rows, D_MODEL, generator=gen)


def task_name(i: int) -> tuple[str, str]:
    """(tenant, task) of the benchmark's i-th task."""
    return f"tenant{i % TENANTS:04d}", f"task{i:07d}"


def register_all(server: LocalServer, tasks: int, in_flight: int, batch: int) -> list[tuple[int, float]]:
    """Register `tasks` prompts through gRPC: RegisterPrompt per prompt (batch 1) or RegisterPrompts
    with `batch` prompts per call, `in_flight` calls outstanding. Returns (tasks registered,
    seconds since start) after each completed call."""
    import grpc

    from promptmux.serving.grpc_convert import tensor_to_pb
    from promptmux.serving.proto_gen import promptmux_pb2 as pb
    from promptmux.serving.proto_gen import promptmux_pb2_grpc

    channel = grpc.insecure_channel(server.address)
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = promptmux_pb2_grpc.PromptmuxStub(channel)
    metadata = [("application", "promptmux"), ("authorization", f"Bearer {server.keys[ADMIN_TENANT]}")]
    slots = threading.Semaphore(in_flight)
    done: list[tuple[int, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=tasks, desc=f"registering ({'1 per call' if batch == 1 else f'{batch} per call'})", unit="task")
    started = time.perf_counter()

    def finished(future, count: int):
        slots.release()
        error = future.exception()
        with lock:
            if error is not None:
                failures.append(str(error))
            elif batch > 1:
                failures.extend(f"{i.error.code}: {i.error.message}" for i in future.result().items if i.HasField("error"))
            done.append(((done[-1][0] if done else 0) + count, time.perf_counter() - started))
        bar.update(count)

    group: list = []
    for i, tensor in enumerate(prompt_tensors(tasks)):
        tenant, task = task_name(i)
        group.append(pb.RegisterPromptRequest(tenant=tenant, task=task, tensor=tensor_to_pb(tensor)))
        if len(group) < batch and i + 1 < tasks:
            continue
        slots.acquire()
        count = len(group)
        if batch == 1:
            call = stub.RegisterPrompt.future(group[0], metadata=metadata, timeout=300)
        else:
            call = stub.RegisterPrompts.future(pb.RegisterPromptsRequest(prompts=group), metadata=metadata, timeout=300)
        call.add_done_callback(lambda future, count=count: finished(future, count))
        group = []
    for _ in range(in_flight):
        slots.acquire()
    bar.close()
    if failures:
        raise SystemExit(f"{len(failures)} registrations failed, e.g. {failures[0]}")
    return done


def idle_replica_cores(server: LocalServer, seconds: float) -> float:
    groups = {"replica": server.replica_pids("promptmux")}
    before = snapshot(groups, time.monotonic())
    time.sleep(seconds)
    return usage(before, snapshot(groups, time.monotonic())).cores("replica")


def live_latency(server: LocalServer) -> float:
    """Seconds from a version written by another process to it being listed by this replica."""
    import grpc

    from promptmux.prompts.quotas import StoreQuotas
    from promptmux.prompts.store import PromptStore
    from promptmux.serving.proto_gen import promptmux_pb2 as pb
    from promptmux.serving.proto_gen import promptmux_pb2_grpc

    stub = promptmux_pb2_grpc.PromptmuxStub(grpc.insecure_channel(server.address))
    metadata = [("application", "promptmux"), ("authorization", f"Bearer {server.keys['probe']}")]
    store = PromptStore(server.store_root, d_model=D_MODEL, max_length=128, quotas=StoreQuotas())
    store.tasks.catch_up()  # this writer's own start-up is not part of the figure
    task = f"fresh{time.perf_counter_ns()}"
    written = time.perf_counter()
    store.register("probe", task, torch.zeros(20, D_MODEL))
    while task not in {t.name for t in stub.ListTasks(pb.ListTasksRequest(), metadata=metadata, timeout=30).tasks}:
        time.sleep(0.02)
    return time.perf_counter() - written


def measure(tasks: int, tenants: int, in_flight: int, idle_seconds: float) -> dict:
    server = LocalServer(apps={"promptmux": app_args(tasks, tenants)}, tenants=["probe"], num_cpus=2)
    server.start()
    try:
        time.sleep(5)  # let start-up settle
        idle_empty = idle_replica_cores(server, idle_seconds)
        roles = {"replica": server.replica_pids("promptmux"), "gRPC proxy": server.proxy_pids()}
        before = snapshot(roles, time.monotonic())
        done = register_all(server, tasks, tenants, in_flight)
        cpu = usage(before, snapshot(roles, time.monotonic()))
        time.sleep(2)
        idle_full = idle_replica_cores(server, idle_seconds)
        latencies = sorted(live_latency(server) for _ in range(5))
    finally:
        server.stop()
    total_s = done[-1][1]
    tenths = []
    for k in range(10):
        lo, hi = done[len(done) * k // 10 - 1] if k else (0, 0.0), done[len(done) * (k + 1) // 10 - 1]
        tenths.append((hi[0] - lo[0]) / max(hi[1] - lo[1], 1e-9))
    return {"tasks": tasks, "tenants": tenants, "in_flight": in_flight, "total_s": total_s,
            "rate": tasks / total_s, "tenths": tenths, "idle_empty": idle_empty, "idle_full": idle_full,
            "live_s": latencies, "idle_seconds": idle_seconds,
            "cpu_ms_per_registration": {role: s / tasks * 1e3 for role, s in cpu.seconds.items()}}


def report(m: dict, machine: str) -> str:
    n = m["tasks"]
    lines = [
        f"# {n:,} tasks on one deployment, through the API ({machine})",
        "",
        f"One replica of the embedded model (d_model={D_MODEL}), a private Ray cluster, store on local disk; "
        f"{n:,} prompts of 20-100 rows registered through gRPC RegisterPrompt, {m['in_flight']} calls in flight, "
        f"over {m['tenants']} tenants. Measured by `python -m promptmux.benchmarks.bench_many_tasks`.",
        "",
        "| figure | measured | target (issue 15) |",
        "|---|---|---|",
        f"| registration rate, whole run | {m['rate']:.0f}/s ({m['total_s']:.0f} s) | >= 500/s |",
        f"| registration rate, slowest tenth of the run | {min(m['tenths']):.0f}/s | >= 500/s sustained |",
        f"| registration rate, first / last tenth | {m['tenths'][0]:.0f}/s / {m['tenths'][-1]:.0f}/s | flat |",
        f"| idle replica process CPU, 0 tasks | {m['idle_empty'] * 100:.2f}% of a core | |",
        f"| idle replica process CPU, {n:,} tasks | {m['idle_full'] * 100:.2f}% of a core | < 1% for keeping current |",
        f"| difference (what keeping {n:,} tasks current costs) | {(m['idle_full'] - m['idle_empty']) * 100:+.2f}% "
        f"of a core | < 1% |",
        f"| new version (written by another process) listed by the replica | median {m['live_s'][2]:.2f} s, "
        f"max {m['live_s'][-1]:.2f} s | < 2 s |",
        "",
        "Rate per tenth of the run: " + ", ".join(f"{r:.0f}" for r in m["tenths"]) + " registrations/s.",
        "",
        "CPU per registration: " + ", ".join(f"{role} {ms:.2f} ms" for role, ms in m["cpu_ms_per_registration"].items())
        + f" (total {sum(m['cpu_ms_per_registration'].values()):.2f} ms, i.e. at most "
        f"{1e3 / max(sum(m['cpu_ms_per_registration'].values()), 1e-9):.0f}/s per core these processes get).",
        "",
        "The idle replica's CPU includes Ray Serve's own upkeep (health checks, metrics pushes, the",
        "controller's polls), which does not depend on the task count; the difference between the",
        "two idle figures is what the task count costs.",
        "",
        "## Projection to 1,000,000 tasks",
        "",
        f"- Registration costs do not grow with the store (first and last tenth above), so 1,000,000 "
        f"registrations at {min(m['tenths']):.0f}/s take {1e6 / min(m['tenths']) / 3600:.1f} h on this machine.",
        "- Keeping current: an idle refresh is one failed open of the next change-log entry, independent "
        "of the task count (benchmarks/results/task_feed_cpu.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--machine", default="2-core CPU", help="how to name this machine in the results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    text = report(measure(args.tasks, args.tenants, args.in_flight, args.idle_seconds), args.machine)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "many_tasks_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
