"""Claims about every replica, on a second application with TWO replicas, its own store, key
file and small quotas (deployed once for this module, next to the shared one): hot updates
reach both replicas, keys rotate through running replicas, a corrupt store file stops
nothing, and quotas hold through gRPC, also for registrations racing on both replicas.

Every unary reply names its replica in the trailing metadata `promptmux-replica`, so each
check knows which replica answered."""
from __future__ import annotations

import glob
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from conftest import ADMIN_KEY, ADMIN_TENANT, D_MODEL, TENANT_KEYS

pytestmark = pytest.mark.ray

APP = "promptmux-pair"
REFRESH_S = 0.1
WAIT_S = 5.0  # bound on anything that must reach both replicas (about 50 refresh intervals)
QUOTAS = {"max_prompts_per_tenant": 3, "max_rows_per_tenant": 20, "max_description_bytes": 64}


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


@dataclass
class Pair:
    stub: object
    store_root: Path
    keys_file: Path
    keys: dict
    corrupt_at_start: Path

    def metadata(self, tenant: str, key: str | None = None):
        return [("application", APP), ("authorization", f"Bearer {key or self.keys[tenant]}")]

    def call(self, method: str, request, tenant: str, key: str | None = None):
        """(replica, reply or grpc.RpcError) of one unary call."""
        try:
            reply, call = getattr(self.stub, method).with_call(request, metadata=self.metadata(tenant, key), timeout=30)
            return replica_of(call), reply
        except grpc.RpcError as error:
            return replica_of(error), error

    def until_both_replicas(self, method: str, request, tenant: str, accept, what: str, key: str | None = None):
        """Repeat a call until each of the two replicas gave an accepted answer; bounded."""
        seen: dict[str, object] = {}
        end = time.monotonic() + WAIT_S
        outcome = None
        while len(seen) < 2:
            assert time.monotonic() < end, (
                f"{what}: only replica(s) {sorted(seen)} did within {WAIT_S}s; the last answer was {outcome!r}"
            )
            replica, outcome = self.call(method, request, tenant, key)
            if accept(outcome):
                seen[replica] = outcome
            else:
                time.sleep(0.02)
        return seen


def replica_of(call) -> str:
    return dict(call.trailing_metadata() or ()).get("promptmux-replica", "")


def code(outcome):
    return outcome.code() if isinstance(outcome, grpc.RpcError) else grpc.StatusCode.OK


def prompt(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(serving, tmp_path_factory):
    from ray import serve

    from promptmux.prompts.store import PromptStore
    from promptmux.serving.replica.app import build_deployment
    from promptmux.serving.replica.auth import write_key_file
    from promptmux.serving.config import AppConfig

    root = tmp_path_factory.mktemp("pair")
    store_root = root / "prompts"
    store = PromptStore(store_root, d_model=D_MODEL, max_length=64)
    store.register("acme", "fine", prompt(1))
    store.register("acme", "broken", prompt(2))
    corrupt_at_start = store_root / "acme" / "broken" / "v00000001.safetensors"
    corrupt_at_start.write_bytes(b"\xff" * 64)  # present before any replica starts
    keys = {**TENANT_KEYS, ADMIN_TENANT: ADMIN_KEY}
    keys_file = write_key_file(root / "keys.yaml", [(t, k, t == ADMIN_TENANT) for t, k in keys.items()])
    args = {
        "model": {"source": "embedded"},
        "store": {"root": str(store_root), "max_prompt_length": 64, "refresh_interval_s": REFRESH_S, **QUOTAS},
        "engine": {"max_batch_size": 8, "max_new_tokens_limit": 16},
        "serving": {"api_keys_file": str(keys_file), "batch_wait_timeout_s": 0.01, "torch_threads": 1},
    }
    app = build_deployment(AppConfig.from_args(args), num_replicas=2, ray_actor_options={"num_cpus": 0.25})
    serve.run(app, name=APP, route_prefix=f"/{APP}", blocking=False)
    harness = Pair(serving.stub(), store_root, keys_file, dict(keys), corrupt_at_start)
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb_module

    end = time.monotonic() + 180
    while True:  # both replicas up: each has answered a call
        try:
            harness.until_both_replicas("ListTasks", pb_module.ListTasksRequest(), "acme", lambda o: code(o) == grpc.StatusCode.OK,
                                        "start-up")
            break
        except (AssertionError, grpc.RpcError):
            assert time.monotonic() < end, "the two-replica application did not start"
            time.sleep(0.5)
    yield harness
    serve.delete(APP)


def replica_logs() -> str:
    import ray

    logs_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    text = []
    for path in glob.glob(str(logs_dir / "**" / "*"), recursive=True):
        if os.path.isfile(path) and path.endswith((".err", ".out", ".log")):
            try:
                text.append(Path(path).read_text(errors="replace"))
            except OSError:
                pass
    return "\n".join(text)


def test_a_corrupt_file_at_start_up_and_during_refresh_stops_nothing(pair, pb):
    # Start-up: both replicas serve although a version file was corrupt before they started.
    listed = pair.until_both_replicas("ListPrompts", pb.ListPromptsRequest(), "acme",
                                      lambda o: code(o) == grpc.StatusCode.OK, "ListPrompts")
    assert all([p.task for p in reply.prompts] == ["fine"] for reply in listed.values())
    # During refresh: a corrupt new version of a task both replicas serve, and a new task
    # whose only version is corrupt, appear in the store...
    info = pair.call("RegisterPrompt", pb.RegisterPromptRequest(task="soon-bad", tensor=tensor_pb(prompt(3))), "globex")[1]
    assert code(info) == grpc.StatusCode.OK
    bad = pair.store_root / "globex" / "soon-bad" / "v00000002.safetensors"
    bad.write_bytes(b"\x00" * 10)
    never_good = pair.store_root / "globex" / "never-good" / "v00000001.safetensors"
    never_good.parent.mkdir()
    never_good.write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    # ...announced in the change log, as their writer did before writing them (replicas read
    # only the tasks the log names)...
    from promptmux.prompts.store import PromptStore

    writer = PromptStore(pair.store_root, d_model=D_MODEL, max_length=64)
    writer.changes.append("register", "globex", "soon-bad", 2)
    writer.changes.append("register", "globex", "never-good", 1)
    # ...then a prompt written elsewhere must still reach both replicas: refresh keeps running.
    writer.register("globex", "after-corruption", prompt(4))
    request = pb.GenerateRequest(task="after-corruption", text="hi", params=pb.GenerationParams(max_new_tokens=4))
    pair.until_both_replicas("Generate", request, "globex", lambda o: code(o) == grpc.StatusCode.OK,
                             "a registration after a corrupt file")
    for method, request in (("ListPrompts", pb.ListPromptsRequest()), ("ListTasks", pb.ListTasksRequest())):
        answers = pair.until_both_replicas(method, request, "globex", lambda o: code(o) == grpc.StatusCode.OK, method)
        for reply in answers.values():
            items = reply.prompts if method == "ListPrompts" else [t for t in reply.tasks if t.owner == "globex"]
            listed = {p.task: p.version for p in items}
            assert listed == {"after-corruption": 1, "soon-bad": 1}  # the newest readable version
    # The task with a corrupt newest version keeps serving its readable one; the unreadable task is absent.
    request = pb.GenerateRequest(task="soon-bad", text="hi", params=pb.GenerationParams(max_new_tokens=4))
    served = pair.until_both_replicas("Generate", request, "globex", lambda o: code(o) == grpc.StatusCode.OK, "soon-bad")
    assert all(r.prompt_versions[0].version == 1 for r in served.values())
    pair.until_both_replicas("Generate", pb.GenerateRequest(task="never-good", text="hi", params=request.params), "globex",
                             lambda o: code(o) == grpc.StatusCode.NOT_FOUND, "the unreadable task")
    # The replicas' logs name both files.
    end = time.monotonic() + 10
    while not all(str(path) in (logs := replica_logs()) for path in (pair.corrupt_at_start, bad, never_good)):
        assert time.monotonic() < end, "the replica log does not name the corrupt files"
        time.sleep(0.5)


def tensor_pb(tensor):
    from promptmux.serving.rpc.convert import tensor_to_pb

    return tensor_to_pb(tensor)


def test_a_registration_through_one_replica_is_served_by_both(pair, pb):
    replica, info = pair.call("RegisterPrompt", pb.RegisterPromptRequest(task="hot", tensor=tensor_pb(prompt(5))), "acme")
    assert code(info) == grpc.StatusCode.OK and replica
    request = pb.GenerateRequest(task="hot", text="hot update", params=pb.GenerationParams(max_new_tokens=6))
    served = pair.until_both_replicas("Generate", request, "acme", lambda o: code(o) == grpc.StatusCode.OK,
                                      "the new prompt being served")
    assert replica in served
    assert len({reply.text for reply in served.values()}) == 1  # the same prompt on both
    assert all([(v.task, v.version) for v in r.prompt_versions] == [("hot", 1)] for r in served.values())
    replica, gone = pair.call("DeletePrompt", pb.DeletePromptRequest(task="hot"), "acme")
    assert code(gone) == grpc.StatusCode.OK
    pair.until_both_replicas("Generate", request, "acme", lambda o: code(o) == grpc.StatusCode.NOT_FOUND,
                             "the deleted prompt disappearing")


def test_keys_rotate_through_running_replicas(pair, pb):
    from promptmux.serving.replica.auth import write_key_file

    request = pb.ListTasksRequest()
    ok = lambda o: code(o) == grpc.StatusCode.OK  # noqa: E731
    old_key, new_key = pair.keys["globex"], "key-globex-rotated-41c2"
    # A broken key file (mid-edit) keeps the loaded keys working on both replicas.
    pair.keys_file.write_text("keys: [this is not: a key list")
    time.sleep(5 * REFRESH_S)
    pair.until_both_replicas("ListTasks", request, "globex", ok, "the old key during a broken key file")
    entries = [(t, new_key if t == "globex" else k, t == ADMIN_TENANT) for t, k in pair.keys.items()]
    write_key_file(pair.keys_file, entries)
    pair.until_both_replicas("ListTasks", request, "globex",
                             lambda o: code(o) == grpc.StatusCode.UNAUTHENTICATED, "the old key stopping", key=old_key)
    pair.until_both_replicas("ListTasks", request, "globex", ok, "the new key working", key=new_key)
    pair.until_both_replicas("ListTasks", request, "acme", ok, "other tenants' keys still working")
    pair.keys["globex"] = new_key
    assert "could not be reloaded" in replica_logs()


def test_quotas_answer_resource_exhausted_through_grpc_and_hold_across_replicas(pair, pb):
    def register(task, rows=4, description="", tenant="flood"):
        request = pb.RegisterPromptRequest(task=task, tensor=tensor_pb(prompt(7, rows)), description=description)
        return pair.call("RegisterPrompt", request, tenant)[1]

    def exhausted(outcome, key):
        assert code(outcome) == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        assert key in outcome.details()

    # Other tenants' requests run concurrently with the abuse and must all succeed.
    other = pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(max_new_tokens=8))
    with ThreadPoolExecutor(max_workers=6) as pool:
        bystanders = [pool.submit(pair.call, "Generate", other, "acme") for _ in range(8)]
        racing = list(pool.map(lambda i: register(f"race-{i}", rows=1), range(6)))  # two replicas race
        assert sorted(code(o).name for o in racing) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 3
        for outcome in racing:
            if code(outcome) != grpc.StatusCode.OK:
                exhausted(outcome, "store.max_prompts_per_tenant")
        assert {p.task for p in pair.call("ListPrompts", pb.ListPromptsRequest(), "flood")[1].prompts} == {
            o.task for o in racing if code(o) == grpc.StatusCode.OK}
        kept = next(o.task for o in racing if code(o) == grpc.StatusCode.OK)
        exhausted(register(kept, rows=19), "store.max_rows_per_tenant")  # 2 + 19 > 20
        assert code(register(kept, rows=18)) == grpc.StatusCode.OK  # 2 + 18 = 20 fits
        exhausted(register(kept, description="x" * 65), "store.max_description_bytes")
        replies = [f.result() for f in bystanders]
    assert all(code(o) == grpc.StatusCode.OK and o.text == "olleh" for _, o in replies)
