"""The prompt store: versions, validation, durability, crash safety."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from promptmux.prompts.store import PromptStore
from promptmux.prompts.errors import InvalidPromptError, PermissionDeniedError, TaskNotFoundError

D = 16


@pytest.fixture
def store(tmp_path):
    return PromptStore(tmp_path / "prompts", d_model=D, max_length=8)


def prompt(rows=4, seed=0, dtype=torch.float32):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_register_get_versions_and_metadata(store):
    first = store.register("acme", "qa", prompt(seed=1), description="first")
    second = store.register("acme", "qa", prompt(rows=6, seed=2), extra={"steps": 100})
    assert (first.version, second.version) == (1, 2)
    latest = store.get("acme", "qa")
    assert latest.meta == second and torch.equal(latest.tensor, prompt(rows=6, seed=2))
    assert torch.equal(store.get("acme", "qa", version=1).tensor, prompt(seed=1))
    assert [m.version for m in store.versions("acme", "qa")] == [1, 2]
    assert second.length == 6 and second.d_model == D and second.dtype == "float32"
    assert second.extra == {"steps": 100} and len(second.content_hash) == 64
    assert first.content_hash != second.content_hash


def test_bf16_prompt_keeps_its_dtype_bit_exact(store):
    tensor = prompt(dtype=torch.bfloat16)
    meta = store.register("acme", "bf", tensor)
    assert meta.dtype == "bfloat16"
    assert torch.equal(store.get("acme", "bf").tensor.view(torch.int16), tensor.view(torch.int16))


def test_list_is_per_tenant_and_shows_latest(store):
    store.register("acme", "a", prompt())
    store.register("acme", "a", prompt(seed=3))
    store.register("globex", "b", prompt())
    assert [(m.task, m.version) for m in store.list("acme")] == [("a", 2)]
    assert [(m.tenant, m.task) for m in store.list()] == [("acme", "a"), ("globex", "b")]


def test_delete_then_register_never_reuses_a_version(store):
    store.register("acme", "a", prompt())
    assert store.delete("acme", "a") == 1
    with pytest.raises(TaskNotFoundError, match="unknown task 'a'"):
        store.get("acme", "a")
    assert store.list() == []
    again = store.register("acme", "a", prompt(seed=5))
    assert again.version == 3  # 1 = first prompt, 2 = the deletion tombstone


def test_resolve_own_then_shared_and_private_is_invisible(store):
    store.register("acme", "private", prompt())
    store.register("acme", "public", prompt(seed=1), shared=True)
    assert store.resolve("globex", "acme/public").tenant == "acme"
    with pytest.raises(TaskNotFoundError):
        store.resolve("globex", "public")  # a share is reached by its owner's name, never by a bare id
    with pytest.raises(TaskNotFoundError) as other:
        store.resolve("globex", "acme/private")
    with pytest.raises(TaskNotFoundError) as unknown:
        store.resolve("globex", "acme/nonexistent-task")
    # Another tenant's private task answers exactly as an unknown one (same message shape).
    assert str(other.value).replace("private", "X") == str(unknown.value).replace("nonexistent-task", "X")


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(4, D + 1), "d_model is 17, but the served model's d_model is 16"),
        (torch.full((4, D), float("nan")), "non-finite values"),
        (torch.tensor([[float("inf")] * D]), "non-finite values"),
        (torch.zeros(9, D), "prompt length 9 is out of range; expected 1..8"),
        (torch.zeros(0, D), "prompt length 0 is out of range"),
        (torch.zeros(D), "2-D"),
        (torch.zeros(4, D, dtype=torch.int32), "dtype torch.int32 is not supported"),
    ],
)
def test_invalid_prompts_are_rejected_and_change_nothing(store, tensor, message):
    store.register("acme", "a", prompt())
    before = sorted(p.name for p in store.root.rglob("*"))
    with pytest.raises(InvalidPromptError, match=message):
        store.register("acme", "a", tensor)
    assert sorted(p.name for p in store.root.rglob("*")) == before
    assert store.meta("acme", "a").version == 1


def test_invalid_ids_and_disallowed_tenants(tmp_path):
    store = PromptStore(tmp_path, d_model=D, max_length=8, allowed_tenants={"acme"})
    with pytest.raises(InvalidPromptError, match="invalid task id '../x'"):
        store.register("acme", "../x", prompt())
    with pytest.raises(PermissionDeniedError, match="tenant 'evil' may not register"):
        store.register("evil", "a", prompt())


def test_a_reopened_store_sees_everything(tmp_path, store):
    store.register("acme", "a", prompt())
    reopened = PromptStore(store.root, d_model=D, max_length=8)
    assert torch.equal(reopened.get("acme", "a").tensor, prompt())


def test_two_store_objects_share_updates_without_restart(store):
    other = PromptStore(store.root, d_model=D, max_length=8)
    store.register("acme", "a", prompt())
    assert other.resolve("acme", "a").version == 1
    store.register("acme", "a", prompt(seed=9))
    assert other.resolve("acme", "a").version == 2


def test_crash_mid_write_leaves_the_previous_version_readable(store):
    """A process killed half-way through writing version 2 leaves version 1 intact."""
    store.register("acme", "a", prompt(seed=1))
    child = textwrap.dedent(
        f"""
        import os, torch
        from promptmux.prompts import store as store_module
        from promptmux.prompts.store import PromptStore
        real_write = os.write
        def crash_after_half(fd, data):
            if len(data) < 300:  # the change log's entry (written first); crash in the version's bytes
                return real_write(fd, data)
            real_write(fd, bytes(data[: len(data) // 2]))
            os._exit(17)  # the process dies mid-write: no cleanup, no exception handlers
        store_module.os.write = crash_after_half
        s = PromptStore({str(store.root)!r}, d_model={D}, max_length=8)
        s.register("acme", "a", torch.ones(4, {D}))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == 17, result.stderr
    leftovers = list((store.root / "acme" / "a").glob(".tmp-*"))
    assert len(leftovers) == 1  # the torn temporary file is there, but never read
    fresh = PromptStore(store.root, d_model=D, max_length=8)
    assert fresh.meta("acme", "a").version == 1
    assert torch.equal(fresh.get("acme", "a").tensor, prompt(seed=1))
    assert fresh.register("acme", "a", prompt(seed=2)).version == 2


def test_concurrent_writers_never_overwrite_each_other(store):
    import threading

    errors = []

    def write(seed):
        try:
            store_copy = PromptStore(store.root, d_model=D, max_length=8)
            for i in range(5):
                store_copy.register("acme", "race", prompt(seed=seed * 100 + i))
        except Exception as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = store.versions("acme", "race")
    assert [m.version for m in versions] == list(range(1, 21))
    assert len({m.content_hash for m in versions}) == 20


def test_stale_temp_files_are_cleaned_when_their_task_is_next_written_not_at_open(store):
    """Opening the store lists no task directory (start-up would grow with the task count)."""
    store.register("acme", "a", prompt())
    temp = store.root / "acme" / "a" / ".tmp-dead"
    temp.write_bytes(b"torn")
    os.utime(temp, (0, 0))
    fresh = store.root / "acme" / "a" / ".tmp-in-flight"  # another writer's, still being written
    fresh.write_bytes(b"half")
    reopened = PromptStore(store.root, d_model=D, max_length=8)
    assert temp.exists()
    reopened.register("acme", "a", prompt())
    assert not temp.exists() and fresh.exists()
    claim_temp = store.root / ".published" / ".tmp-dead"
    claim_temp.parent.mkdir(exist_ok=True)
    claim_temp.write_bytes(b"torn")
    os.utime(claim_temp, (0, 0))
    PromptStore(store.root, d_model=D, max_length=8)
    assert not claim_temp.exists()  # the claims' and the change log's leftovers still go at open
