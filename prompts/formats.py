"""Import and export of prompts in the formats users already have.

- T5X / google-research prompt-tuning: `np.save` of float32 `(L, d_model)`, often in a file
  with no `.npy` suffix.
- PEFT prompt tuning: a directory with `adapter_config.json` and
  `adapter_model.safetensors` (key `prompt_embeddings`, or `adapter_model.bin`). With
  `num_transformer_submodules=2` the first `num_virtual_tokens` rows are the encoder prompt.
- safetensors: one tensor (any key), or the key `prompt`. A promptmux export may also hold
  the version's task embedding under `task_embedding` (`load_task_embedding`).
- NeMo p-tuning / prompt tuning: a `.nemo` archive (see `load_nemo` for the layouts read).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from promptmux.prompts.errors import InvalidPromptError

_NUMPY_MAGIC = b"\x93NUMPY"


FORMATS = ("auto", "numpy", "peft", "safetensors", "nemo")


def load_prompt(path: str | Path, fmt: str = "auto", *, nemo_task: str | None = None) -> torch.Tensor:
    """Read a prompt `[L, D]` from `path` in format `numpy`, `peft`, `safetensors`, `nemo` or
    `auto`. `nemo_task` picks one task of a NeMo prompt table that holds several."""
    path = Path(path)
    if not path.exists():
        raise InvalidPromptError(f"prompt file {str(path)!r} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    loaders = {"numpy": load_numpy, "peft": load_peft, "safetensors": load_safetensors,
               "nemo": lambda p: load_nemo(p, nemo_task)}
    if fmt not in loaders:
        raise InvalidPromptError(f"unknown prompt format {fmt!r}; expected one of {sorted(loaders)} or 'auto'")
    return loaders[fmt](path)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return "peft"
        raise InvalidPromptError(
            f"{str(path)!r} is a directory without adapter_config.json; expected a PEFT prompt-tuning "
            "directory, a numpy file or a safetensors file"
        )
    with path.open("rb") as handle:
        head = handle.read(16)
    if path.suffix == ".nemo" or (not head.startswith(_NUMPY_MAGIC) and tarfile.is_tarfile(path)):
        return "nemo"
    if head.startswith(_NUMPY_MAGIC):
        return "numpy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise InvalidPromptError(
        f"cannot tell the format of {str(path)!r}: it is neither a numpy (.npy) array nor a safetensors "
        "file; pass the format explicitly"
    )


def load_numpy(path: Path) -> torch.Tensor:
    with Path(path).open("rb") as handle:  # a file object: np.load would otherwise add no suffix logic
        array = np.load(handle, allow_pickle=False)
    return torch.from_numpy(np.ascontiguousarray(array))


def load_safetensors(path: Path, key: str | None = None) -> torch.Tensor:
    tensors = load_file(str(path))
    if key is None:
        if "prompt" in tensors:
            key = "prompt"
        elif len(tensors) == 1:
            key = next(iter(tensors))
        else:
            raise InvalidPromptError(
                f"{str(path)!r} holds several tensors {sorted(tensors)}; name the one to import "
                "(a promptmux export stores it under 'prompt')"
            )
    if key not in tensors:
        raise InvalidPromptError(f"{str(path)!r} has no tensor {key!r}; it holds {sorted(tensors)}")
    return tensors[key]


def load_peft(directory: Path) -> torch.Tensor:
    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise InvalidPromptError(
            f"{str(directory)!r} holds a {peft_type} adapter; only PEFT PROMPT_TUNING adapters are soft prompts"
        )
    weights_path = directory / "adapter_model.safetensors"
    if weights_path.exists():
        weights = load_file(str(weights_path))
    elif (directory / "adapter_model.bin").exists():
        weights = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InvalidPromptError(f"{str(directory)!r} has neither adapter_model.safetensors nor adapter_model.bin")
    if "prompt_embeddings" not in weights:
        raise InvalidPromptError(
            f"PEFT weights in {str(directory)!r} have no 'prompt_embeddings' key; found {sorted(weights)}"
        )
    embeddings = weights["prompt_embeddings"]  # [num_virtual_tokens * submodules, D]
    tokens = int(config["num_virtual_tokens"])
    # Seq2seq adapters may carry a decoder copy after the encoder rows; the encoder prompt is first.
    return embeddings[:tokens].contiguous()


def export_safetensors(
    tensor: torch.Tensor,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    task_embedding: torch.Tensor | None = None,
) -> None:
    tensors = {"prompt": tensor.contiguous()}
    if task_embedding is not None:
        tensors["task_embedding"] = task_embedding.contiguous()
    save_file(tensors, str(path), metadata=metadata)


def load_task_embedding(path: str | Path) -> torch.Tensor | None:
    """The task embedding a promptmux export carries beside its prompt, if any."""
    path = Path(path)
    if path.is_dir() or detect_format(path) != "safetensors":
        return None
    return load_file(str(path)).get("task_embedding")


# ---------------------------------------------------------------------- NeMo
# A `.nemo` file is a tar archive (plain or gzipped) holding `model_config.yaml` and
# `model_weights.ckpt` (a torch-saved dict), at the top or under `mp_rank_00/` or
# `tp_rank_00_pp_rank_000/` for model-parallel saves. The soft prompt is read from the first
# of these layouts that the weights hold:
#   1. NeMo 1.x prompt learning (MegatronGPT/T5 prompt learning models after p-tuning or
#      prompt tuning): `weights["prompt_table"]["prompt_table.<taskname>.prompt_embeddings.weight"]`,
#      one `[total_virtual_tokens, hidden]` table per task named in model_config.yaml's
#      `task_templates` (as read by NVIDIA/TensorRT-LLM examples/gpt/nemo_prompt_convert.py);
#   2. NeMo PEFT p-tuning, mcore models:
#      `weights["model.embedding.adapter_layer.ptuning_adapter.inference_table"]`;
#   3. NeMo PEFT p-tuning, legacy models: `weights["model.language_model.adapter_layer.
#      ptuning_adapter.inference_table.prompt_table.taskname.prompt_embeddings.weight"]`
#      (2 and 3 as read by NVIDIA/NeMo nemo/export/tensorrt_llm.py, `_get_prompt_embedding_table_ckpt`).
# Only the inference table is read: a p-tuning prompt *encoder* (an MLP/LSTM that still has to
# be run) is not a soft prompt, and NeMo writes the table when p-tuning finishes.
_NEMO_WEIGHT_PATHS = ("model_weights.ckpt", "mp_rank_00/model_weights.ckpt", "tp_rank_00_pp_rank_000/model_weights.ckpt")
_NEMO_PTUNING_KEYS = (
    "model.embedding.adapter_layer.ptuning_adapter.inference_table",
    "model.language_model.adapter_layer.ptuning_adapter.inference_table.prompt_table.taskname.prompt_embeddings.weight",
)


def load_nemo(path: Path, task: str | None = None) -> torch.Tensor:
    """The soft prompt `[L, D]` of a NeMo prompt-learning checkpoint (`.nemo` archive)."""
    weights = _nemo_weights(Path(path))
    tables = {
        key.removeprefix("prompt_table.").removesuffix(".prompt_embeddings.weight"): value
        for key, value in (weights.get("prompt_table") or {}).items()
        if key.startswith("prompt_table.") and key.endswith(".prompt_embeddings.weight")
    }
    if tables:
        if task is None and len(tables) == 1:
            task = next(iter(tables))
        if task not in tables:
            raise InvalidPromptError(
                f"{str(path)!r} holds NeMo prompt tables for tasks {sorted(tables)}; "
                + ("name the one to import (--nemo-task)" if task is None else f"it has no task {task!r}")
            )
        return _nemo_tensor(tables[task], path)
    for key in _NEMO_PTUNING_KEYS:
        if key in weights:
            table = weights[key]
            if isinstance(table, dict):  # some saves keep the inference table as a state dict
                table = next((v for k, v in table.items() if k.endswith("prompt_embeddings.weight")), None)
            if table is not None:
                return _nemo_tensor(table, path)
    raise InvalidPromptError(
        f"{str(path)!r} has no NeMo prompt table: expected 'prompt_table' with "
        "'prompt_table.<task>.prompt_embeddings.weight' keys, or a p-tuning inference table "
        f"({', '.join(_NEMO_PTUNING_KEYS)}); found keys {sorted(weights)[:8]}. A p-tuning checkpoint "
        "saved before training finished holds only its prompt encoder: finish training in NeMo first"
    )


def _nemo_weights(path: Path) -> dict:
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.TarError as error:
        raise InvalidPromptError(f"{str(path)!r} is not a .nemo archive (a tar file): {error}") from None
    with archive:
        members = {member.name.removeprefix("./"): member for member in archive.getmembers() if member.isfile()}
        name = next((n for n in _NEMO_WEIGHT_PATHS if n in members), None)
        if name is None:
            raise InvalidPromptError(
                f"{str(path)!r} has none of {list(_NEMO_WEIGHT_PATHS)}; it holds {sorted(members)[:8]}"
            )
        data = archive.extractfile(members[name]).read()
    # weights_only: a checkpoint from elsewhere must not run code when it is read.
    weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(weights, dict):
        raise InvalidPromptError(f"{name} in {str(path)!r} is a {type(weights).__name__}, expected a state dict")
    return weights


def _nemo_tensor(table, path: Path) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise InvalidPromptError(f"the NeMo prompt table in {str(path)!r} is {shape}; expected [virtual_tokens, hidden]")
    return table.detach().float().contiguous() if table.dtype not in (torch.float32, torch.bfloat16) else table.contiguous()
