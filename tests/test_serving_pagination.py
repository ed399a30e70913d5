"""ListTasks and ListPrompts in pages: every task exactly once while tasks are added, and
today's clients (no page_size) still get everything in one reply."""
from __future__ import annotations

import grpc
import pytest
import torch

from promptmux.prompts.errors import InvalidRequestError
from promptmux.serving.rpc.pagination import MAX_PAGE_SIZE, page

D_MODEL = 256


def test_pages_of_a_sorted_listing():
    items = [(f"t{i:03d}", i) for i in range(25)]
    first, token = page(items, 10, "", "tasks:acme")
    assert first == list(range(10)) and token
    second, token = page(items, 10, token, "tasks:acme")
    third, last = page(items, 10, token, "tasks:acme")
    assert second == list(range(10, 20)) and third == list(range(20, 25)) and last == ""
    assert page(items, 0, "", "tasks:acme") == (list(range(25)), "")  # no page_size: everything
    assert len(page([(f"{i:05d}", i) for i in range(3000)], 5000, "", "x")[0]) == MAX_PAGE_SIZE
    for bad in ("not-a-token", page(items, 10, "", "tasks:globex")[1]):  # garbage, another listing's
        with pytest.raises(InvalidRequestError, match="next_page_token"):
            page(items, 10, bad, "tasks:acme")


@pytest.mark.ray
def test_pages_cover_every_task_exactly_once_while_tasks_are_added(serving):
    from promptmux.serving.rpc.convert import tensor_to_pb
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    stub, globex = serving.stub(), serving.metadata("globex")

    def register(task):
        request = pb.RegisterPromptRequest(task=task, tensor=tensor_to_pb(torch.ones(2, D_MODEL)))
        stub.RegisterPrompt(request, metadata=globex, timeout=30)

    added = []
    try:
        for i in range(0, 40, 2):
            added.append(f"page-{i:02d}")
            register(added[-1])
        everything = [t.name for t in stub.ListTasks(pb.ListTasksRequest(), metadata=globex, timeout=30).tasks]
        assert set(added) <= set(everything)

        for method, request_type, items_of, name_of in (
            ("ListTasks", pb.ListTasksRequest, lambda r: r.tasks, lambda t: t.name),
            ("ListPrompts", pb.ListPromptsRequest, lambda r: r.prompts, lambda p: p.task),
        ):
            before = {name_of(x) for x in items_of(getattr(stub, method)(request_type(), metadata=globex, timeout=30))}
            seen, token, pages = [], "", 0
            while True:
                reply = getattr(stub, method)(request_type(page_size=6, page_token=token), metadata=globex, timeout=30)
                names = [name_of(x) for x in items_of(reply)]
                assert len(names) <= 6 and names == sorted(names)
                seen += names
                pages += 1
                # Tasks added between pages, before and after the cursor.
                for task in (f"page-{method}-{pages:02d}a", f"a-{method}-{pages:02d}"):
                    added.append(task)
                    register(task)
                token = reply.next_page_token
                if not token:
                    break
            assert pages >= 4, "the listing needs several pages"
            assert len(seen) == len(set(seen))  # nothing twice
            assert before <= set(seen)  # everything that existed throughout, once
            assert {f"page-{method}-02a"} <= set(seen)  # added after the cursor: listed
            assert not {f"a-{method}-01"} & set(seen)  # added before the cursor: not listed on this pass

        unpaged = stub.ListPrompts(pb.ListPromptsRequest(), metadata=globex, timeout=30)
        assert unpaged.next_page_token == "" and set(added) <= {p.task for p in unpaged.prompts}
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListTasks(pb.ListTasksRequest(page_size=5, page_token="garbage"), metadata=globex, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "next_page_token" in refused.value.details()
    finally:
        for task in added:
            stub.DeletePrompt(pb.DeletePromptRequest(task=task), metadata=globex, timeout=30)
