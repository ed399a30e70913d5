"""Import and export of prompts in the formats users already have.

- T5X / google-research prompt-tuning: `np.save` of float32 `(L, d_model)`, often in a file
  with no `.npy` suffix.
- PEFT prompt tuning: a directory with `adapter_config.json` and
  `adapter_model.safetensors` (key `prompt_embeddings`, or `adapter_model.bin`). With
  `num_transformer_submodules=2` the first `num_virtual_tokens` rows are the encoder prompt.
- safetensors: one tensor (any key), or the key `prompt`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from promptmux.prompts.errors import InvalidPromptError

_NUMPY_MAGIC = b"\x93NUMPY"


def load_prompt(path: str | Path, fmt: str = "auto") -> torch.Tensor:
    """Read a prompt `[L, D]` from `path` in format `numpy`, `peft`, `safetensors` or `auto`."""
    path = Path(path)
    if not path.exists():
        raise InvalidPromptError(f"prompt file {str(path)!r} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    loaders = {"numpy": load_numpy, "peft": load_peft, "safetensors": load_safetensors}
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


def export_safetensors(tensor: torch.Tensor, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({"prompt": tensor.contiguous()}, str(path), metadata=metadata)
