"""NeMo prompt-learning checkpoints (`.nemo` archives) import bit-exactly, in every layout read."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from promptmux.prompts.formats import detect_format, load_prompt
from promptmux.prompts.store import PromptStore
from promptmux.serving.cli import main as cli
from promptmux.prompts.errors import InvalidPromptError

D = 32
TINY_D_MODEL = 64  # random:tiny
PTUNING_MCORE = "model.embedding.adapter_layer.ptuning_adapter.inference_table"
PTUNING_LEGACY = ("model.language_model.adapter_layer.ptuning_adapter.inference_table.prompt_table.taskname."
                  "prompt_embeddings.weight")


def table(rows: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def write_nemo(path, weights: dict, *, config: dict | None = None, weights_at: str = "model_weights.ckpt",
               mode: str = "w") -> None:
    """A .nemo archive as NeMo's save_to writes it: model_config.yaml + model_weights.ckpt, './'-prefixed."""
    members = {"model_config.yaml": yaml.safe_dump(config or {}).encode()}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    members[weights_at] = buffer.getvalue()
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_prompt_learning_table_round_trips_through_the_store(tmp_path):
    qa, summary = table(10, 1), table(7, 2)
    config = {"task_templates": [{"taskname": "qa", "total_virtual_tokens": 10},
                                 {"taskname": "summary", "total_virtual_tokens": 7}]}
    path = tmp_path / "p_tuned.nemo"
    write_nemo(path, {"prompt_table": {"prompt_table.qa.prompt_embeddings.weight": qa,
                                       "prompt_table.summary.prompt_embeddings.weight": summary}}, config=config)
    assert detect_format(path) == "nemo"
    assert torch.equal(load_prompt(path, nemo_task="summary"), summary)
    with pytest.raises(InvalidPromptError, match=r"tasks \['qa', 'summary'\].*--nemo-task"):
        load_prompt(path)
    store = PromptStore(tmp_path / "store", d_model=D, max_length=64)
    store.register("acme", "qa", load_prompt(path, nemo_task="qa"))
    assert torch.equal(store.get("acme", "qa").tensor, qa)


@pytest.mark.parametrize("key", [PTUNING_MCORE, PTUNING_LEGACY])
@pytest.mark.parametrize("weights_at", ["model_weights.ckpt", "mp_rank_00/model_weights.ckpt"])
def test_peft_ptuning_inference_tables_and_model_parallel_paths(tmp_path, key, weights_at):
    expected = table(9, 3, torch.bfloat16)
    path = tmp_path / "ptuning.nemo"
    write_nemo(path, {key: expected, "model.embedding.adapter_layer.ptuning_adapter.first.weight": table(4, 4)},
               weights_at=weights_at, mode="w:gz")  # older NeMo gzipped its archives
    loaded = load_prompt(path)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, expected)


def test_cli_imports_a_nemo_archive(tmp_path, capsys):
    expected = torch.randn(6, TINY_D_MODEL, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "one_task.nemo"
    write_nemo(path, {"prompt_table": {"prompt_table.taskname.prompt_embeddings.weight": expected}})
    store_dir = tmp_path / "store"
    assert cli.main(["prompts", "import", "--model", "random:tiny", "--store", str(store_dir), "--tenant", "acme",
                     "--task", "qa", str(path)]) == 0
    assert "registered acme/qa version 1: length 6" in capsys.readouterr().out
    store = PromptStore(store_dir, d_model=TINY_D_MODEL, max_length=1024)
    assert torch.equal(store.get("acme", "qa").tensor, expected)


def test_archives_without_a_prompt_table_say_what_they_hold(tmp_path):
    path = tmp_path / "encoder_only.nemo"
    write_nemo(path, {"prompt_encoder.lstm.weight": table(3, 6)})
    with pytest.raises(InvalidPromptError, match="no NeMo prompt table.*prompt_encoder.lstm.weight"):
        load_prompt(path)
    path = tmp_path / "no_weights.nemo"
    with tarfile.open(path, "w") as archive:
        archive.addfile(tarfile.TarInfo("./model_config.yaml"), io.BytesIO(b""))
    with pytest.raises(InvalidPromptError, match="model_weights.ckpt"):
        load_prompt(path, "nemo")
