"""Import from the formats users already have, and export; all bit-exact."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from promptmux.prompts.formats import export_safetensors, load_prompt
from promptmux.prompts.store import PromptStore
from promptmux.prompts.errors import InvalidPromptError

D = 32


def reference(rows=7):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(3))


def roundtrip_through_store(tmp_path, tensor):
    store = PromptStore(tmp_path / "store", d_model=D, max_length=64)
    store.register("acme", "t", tensor)
    out = tmp_path / "exported.safetensors"
    export_safetensors(store.get("acme", "t").tensor, out)
    return load_prompt(out)


@pytest.mark.parametrize("name", ["prompt.npy", "prompt_without_suffix"])
def test_t5x_numpy_with_or_without_suffix(tmp_path, name):
    array = reference().numpy()
    path = tmp_path / name
    with path.open("wb") as handle:  # np.save on a file object keeps the name as given
        np.save(handle, array)
    loaded = load_prompt(path)
    assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), array)
    assert torch.equal(roundtrip_through_store(tmp_path, loaded), torch.from_numpy(array))


@pytest.mark.parametrize("submodules", [1, 2])
def test_peft_prompt_tuning_directory(tmp_path, submodules):
    tokens = 5
    weights = torch.randn(tokens * submodules, D)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": tokens,
                    "num_transformer_submodules": submodules, "token_dim": D})
    )
    save_file({"prompt_embeddings": weights}, str(tmp_path / "adapter_model.safetensors"))
    loaded = load_prompt(tmp_path)
    assert torch.equal(loaded, weights[:tokens])  # the encoder prompt comes first
    assert torch.equal(roundtrip_through_store(tmp_path, loaded), weights[:tokens])


def test_safetensors_any_single_key_and_bf16(tmp_path):
    tensor = reference().to(torch.bfloat16)
    save_file({"whatever": tensor}, str(tmp_path / "p.safetensors"))
    loaded = load_prompt(tmp_path / "p.safetensors")
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.view(torch.int16), tensor.view(torch.int16))
    assert torch.equal(roundtrip_through_store(tmp_path, loaded).view(torch.int16), tensor.view(torch.int16))


def test_clear_errors_for_unreadable_inputs(tmp_path):
    with pytest.raises(InvalidPromptError, match="does not exist"):
        load_prompt(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"not a prompt at all")
    with pytest.raises(InvalidPromptError, match="cannot tell the format"):
        load_prompt(tmp_path / "junk")
    save_file({"a": torch.zeros(1, D), "b": torch.zeros(1, D)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InvalidPromptError, match="several tensors"):
        load_prompt(tmp_path / "two.safetensors")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidPromptError, match="LORA adapter"):
        load_prompt(tmp_path / "lora")
