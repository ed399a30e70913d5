"""`prompts train --init retrieved | best-of-k`: sources come from the tasks the tenant can call,
and the run's metadata records them with their scores."""
from __future__ import annotations

import pytest
import torch
import yaml

from promptmux.prompts.store import PromptStore
from promptmux.prompts.synthetic_tasks import task_examples, write_jsonl
from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY
from promptmux.serving.cli import main as cli

TINY_D = 64


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Sources trained by the CLI (each with its task embedding), one of them another tenant's private task."""
    root = tmp_path_factory.mktemp("transfer")
    config = root / "promptmux.yaml"
    config.write_text(yaml.safe_dump({"model": {"source": "random:tiny"}, "store": {"root": str(root / "store")},
                                      "task_embedding": {"steps": 2, "batch_size": 8, "prompt_length": 6}}))
    for task in ("upper", "reverse", "sort", "copy"):
        write_jsonl(task_examples(task, 24, seed=1), root / f"{task}.jsonl")
        write_jsonl(task_examples(task, 6, seed=2), root / f"{task}-dev.jsonl")
    sources = [("acme", "upper", False), ("acme", "sort", False), ("demo", "copy", True), ("globex", "reverse", False)]
    for tenant, task, shared in sources:
        argv = ["prompts", "train", "--config", str(config), "--tenant", tenant, "--task", task, "--data",
                str(root / f"{task}.jsonl"), "--length", "4", "--steps", "2", "--batch-size", "8", "--no-progress"]
        assert cli.main(argv + (["--shared"] if shared else [])) == 0
    return root, config


def store_of(root) -> PromptStore:
    return PromptStore(root / "store", d_model=TINY_D, max_length=1024)


def train(root, config, *extra: str) -> None:
    assert cli.main(["prompts", "train", "--config", str(config), "--tenant", "acme", "--data",
                     str(root / "reverse.jsonl"), "--dev", str(root / "reverse-dev.jsonl"), "--steps", "2",
                     "--batch-size", "8", "--eval-every", "2", "--no-progress", *extra]) == 0


def test_trained_prompts_carry_a_task_embedding(library):
    root, _ = library
    stored = store_of(root).get("acme", "upper")
    assert stored.task_embedding.shape == (6, TINY_D)
    assert stored.meta.extra[TASK_EMBEDDING_EXTRA_KEY]["steps"] == 2


def test_retrieved_init_averages_visible_sources_by_similarity(library):
    root, config = library
    train(root, config, "--task", "target-retrieved", "--init", "retrieved", "--top-k", "2")
    store = store_of(root)
    meta = store.meta("acme", "target-retrieved")
    transfer = meta.extra["transfer"]
    assert transfer["method"] == "retrieved" and len(transfer["sources"]) == 2
    assert {(s["tenant"], s["task"]) for s in transfer["sources"]} <= {("acme", "upper"), ("acme", "sort"), ("demo", "copy")}
    assert sum(s["weight"] for s in transfer["sources"]) == pytest.approx(1.0)
    similarities = [s["similarity"] for s in transfer["sources"]]
    assert similarities == sorted(similarities, reverse=True)
    assert meta.extra["init_source"] == "retrieved:top2"


def test_weighted_average_uses_positive_similarities_as_weights():
    from promptmux.prompts.records import PromptMeta
    from promptmux.prompts.retrieval import Match
    from promptmux.prompts.transfer import weighted_average

    def match(task, score):
        return Match(PromptMeta("acme", task, 1, "", TINY_D, 2, "float32", 0.0), score)

    a, b, c = torch.full((2, TINY_D), 1.0), torch.full((2, TINY_D), 4.0), torch.full((2, TINY_D), 100.0)
    init = weighted_average([(match("a", 0.6), a), (match("b", 0.2), b), (match("c", -0.5), c)])
    assert torch.allclose(init.prompt, torch.full((2, TINY_D), 0.75 * 1 + 0.25 * 4))  # c's weight is 0
    assert [s["weight"] for s in init.metadata["sources"]] == [0.75, 0.25, 0.0]
    uniform = weighted_average([(match("a", -0.1), a), (match("b", -0.3), b)])
    assert torch.allclose(uniform.prompt, torch.full((2, TINY_D), 2.5))


def test_best_of_k_probes_each_source_and_records_the_choice(library, capsys):
    root, config = library
    train(root, config, "--task", "target-best", "--init", "best-of-k", "--top-k", "3", "--probe-steps", "1")
    chose_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("best-of-k chose ")]
    transfer = store_of(root).meta("acme", "target-best").extra["transfer"]
    assert transfer["method"] == "best-of-k" and transfer["probe_steps"] == 1 and len(transfer["sources"]) == 3
    assert all("probe_exact_match" in s and "probe_loss" in s for s in transfer["sources"])
    assert all(s["task"] != "reverse" for s in transfer["sources"])  # globex's private task is never a source
    best = max(transfer["sources"], key=lambda s: (s["probe_exact_match"], -s["probe_loss"]))
    assert (transfer["chosen"]["tenant"], transfer["chosen"]["task"]) == (best["tenant"], best["task"])
    assert chose_line == [f"best-of-k chose {best['tenant']}/{best['task']}: dev exact match "
                          f"{best['probe_exact_match']:.3f}, loss {best['probe_loss']:.4f} after 1 steps"]


def test_sources_of_another_length_are_named_when_skipped(library, capsys):
    root, config = library
    store = store_of(root)
    upper = store.get("acme", "upper")  # the same task embedding, on a prompt twice as long
    longer = store.register("acme", "upper-long", torch.cat([upper.tensor, upper.tensor]),
                            task_embedding=upper.task_embedding,
                            extra={TASK_EMBEDDING_EXTRA_KEY: upper.meta.extra[TASK_EMBEDDING_EXTRA_KEY]})
    assert longer.length == 8
    # upper's own data: upper and upper-long rank first, ahead of every other source kept
    assert cli.main(["prompts", "train", "--config", str(config), "--tenant", "acme", "--task", "target-length",
                     "--data", str(root / "upper.jsonl"), "--init", "retrieved", "--top-k", "3", "--length", "4",
                     "--steps", "1", "--batch-size", "8", "--no-progress", "--no-register"]) == 0
    out = capsys.readouterr().out
    assert "skipped, not 4 rows like the sources kept: acme/upper-long (8 rows," in out


def test_retrieval_without_any_embedded_source_fails_clearly(tmp_path, capsys):
    write_jsonl(task_examples("upper", 8, seed=1), tmp_path / "d.jsonl")
    code = cli.main(["prompts", "train", "--model", "random:tiny", "--store", str(tmp_path / "s"), "--tenant", "x",
                     "--task", "t", "--data", str(tmp_path / "d.jsonl"), "--init", "retrieved", "--steps", "1",
                     "--no-progress"])
    assert code == 1 and "no stored task has a comparable task embedding" in capsys.readouterr().err
