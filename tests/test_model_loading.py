"""Model loading: local checkpoints, named random shapes, dtypes, clear failures."""
from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer

from promptmux.serving.config import ModelConfig
from promptmux.serving.errors import ModelLoadError
from promptmux.serving.model_loading import load_model, model_d_model
from promptmux.serving.model_shapes import SHAPES, build_random_model, shape_config


def test_local_checkpoint_directory_loads_frozen_and_equal(tmp_path):
    reference = build_random_model("tiny", seed=3).eval()
    reference.save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(source=str(tmp_path)))
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([loaded.tokenizer("abc")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reference.generate(input_ids=ids, max_new_tokens=5), loaded.model.generate(input_ids=ids, max_new_tokens=5))
    assert model_d_model(ModelConfig(source=str(tmp_path))) == 64


def test_checkpoint_without_tokenizer_files_falls_back_to_bytes_only_for_byt5_vocab(tmp_path):
    build_random_model("tiny").save_pretrained(tmp_path)
    assert len(load_model(ModelConfig(source=str(tmp_path))).tokenizer) == 384
    other = tmp_path / "other"
    build_random_model("t5-small").save_pretrained(other)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(ModelConfig(source=str(other)))


def test_bf16_random_shape():
    loaded = load_model(ModelConfig(source="random:tiny", dtype="bfloat16"))
    assert loaded.model.shared.weight.dtype == torch.bfloat16 and loaded.d_model == 64


@pytest.mark.parametrize(
    "config, message",
    [
        (ModelConfig(source="/nonexistent/model"), "has no config.json"),
        (ModelConfig(source="random:t5-huge"), "unknown model shape 't5-huge'"),
        (ModelConfig(source="random:tiny", dtype="float16"), "T5 overflows in float16"),
        (ModelConfig(source="random:tiny", quantization="8bit"), None),
    ],
)
def test_clear_errors(config, message):
    if config.quantization != "none":
        message = "quantization" if not torch.cuda.is_available() else None
        if message is None:
            pytest.skip("8-bit loading is exercised on GPU machines")
        config = ModelConfig(source="/nonexistent", quantization="8bit")
        message = "has no config.json"
    with pytest.raises(ModelLoadError, match=message):
        load_model(config)


def test_shapes_match_the_published_sizes():
    xxl = shape_config("t5-xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.num_layers, xxl.vocab_size) == (4096, 10240, 64, 24, 32128)
    embedded = build_random_model("embedded")
    assert round(sum(p.numel() for p in embedded.parameters()) / 1e6, 1) == 4.8
    assert set(SHAPES) >= {"tiny", "embedded", "t5-small", "t5-xxl"}
