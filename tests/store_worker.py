"""Child processes for the store's multi-process tests (tests/test_store_safety.py).

    python tests/store_worker.py race ROOT TENANT TASK COUNT ACKS
        one forked child registers COUNT versions while another deletes the task in a loop
    python tests/store_worker.py fill ROOT TENANT MAX_PROMPTS ACKS PROCS
        PROCS forked children register new tasks until the prompt quota refuses them
    python tests/store_worker.py zygote ROOT TENANT TASK ACKS
        one forked registering child per "fork" line on stdin; prints each child's pid

An acknowledgement is written only after `register` returned, as one whole line, fsynced:
"<version> <content hash>\\n". `zygote` imports everything once, then forks one registering
child per "fork" line on stdin and prints the child's pid, so a test can SIGKILL children at
random points without paying an interpreter start each time. Every mode forks from one
interpreter for the same reason: the children are separate processes with their own store
objects, as two replicas are.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from promptmux.prompts.errors import QuotaExceededError, TaskNotFoundError
from promptmux.prompts.quotas import StoreQuotas
from promptmux.prompts.store import PromptStore

D, MAX_LENGTH = 16, 8


def open_store(root: str, max_prompts: int = 10_000) -> PromptStore:
    return PromptStore(root, d_model=D, max_length=MAX_LENGTH, quotas=StoreQuotas(max_prompts_per_tenant=max_prompts))


def ack(fd: int, line: str) -> None:
    os.write(fd, line.encode())
    os.fsync(fd)


def register_loop(store: PromptStore, tenant: str, task: str, count: int, acks: str) -> None:
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    salt = os.getpid() * 100_000
    i = 0
    while count < 0 or i < count:
        tensor = torch.full((4, D), float(salt + i))  # distinct content per registration
        meta = store.register(tenant, task, tensor)
        ack(fd, f"{meta.version} {meta.content_hash}\n")
        i += 1


def delete_loop(store: PromptStore, tenant: str, task: str, stop: str) -> None:
    while not os.path.exists(stop):
        try:
            store.delete(tenant, task)
        except TaskNotFoundError:
            time.sleep(0.001)


def fill(store: PromptStore, tenant: str, acks: str) -> None:
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(10_000):
        try:
            meta = store.register(tenant, f"t{os.getpid()}-{i}", torch.zeros(1, D))
        except QuotaExceededError:
            return
        ack(fd, f"{meta.task}\n")


def zygote(root: str, tenant: str, task: str, acks: str) -> None:
    store = open_store(root)
    for line in sys.stdin:
        if line.strip() != "fork":
            break
        pid = os.fork()
        if pid == 0:
            try:
                register_loop(open_store(root), tenant, task, -1, acks)
            finally:
                os._exit(0)
        print(pid, flush=True)
        for _ in range(2):  # reap children the test killed
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
    del store


def forked(work) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait_ok(pids: list[int]) -> None:
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child {pid} failed")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # no thread pools to inherit across fork
    mode, root, tenant = argv[:3]
    if mode == "race":
        task, count, acks = argv[3], int(argv[4]), argv[5]
        stop = acks + ".stop"
        deleter = forked(lambda: delete_loop(open_store(root), tenant, task, stop))
        registrar = forked(lambda: register_loop(open_store(root), tenant, task, count, acks))
        wait_ok([registrar])
        open(stop, "w").close()
        wait_ok([deleter])
    elif mode == "fill":
        limit, acks, procs = int(argv[3]), argv[4], int(argv[5])
        wait_ok([forked(lambda: fill(open_store(root, max_prompts=limit), tenant, acks)) for _ in range(procs)])
    elif mode == "zygote":
        zygote(root, tenant, argv[3], argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
