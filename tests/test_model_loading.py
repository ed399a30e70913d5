"""Model loading: local checkpoints, named random shapes, dtypes, clear failures."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import require_module
from transformers import ByT5Tokenizer

from promptmux.serving.config import ModelConfig
from promptmux.prompts.errors import ModelLoadError
from promptmux.serving.model.loading import load_model, model_d_model
from promptmux.serving.model.shapes import SHAPES, build_random_model, shape_config


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
        (ModelConfig(source="/nonexistent", quantization="8bit"), "has no config.json"),
    ],
)
def test_clear_errors(config, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(config)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    reference = build_random_model("tiny", seed=3).eval()
    reference.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path, reference


def test_8bit_loading_quantises_the_projections_and_keeps_wo_and_lm_head(tiny_checkpoint):
    """The real bitsandbytes path (it runs on CPU too): int8 projections, full-precision `wo`."""
    bitsandbytes = require_module("bitsandbytes")
    path, reference = tiny_checkpoint
    loaded = load_model(ModelConfig(source=str(path), quantization="8bit"))
    model = loaded.model
    int8 = {name for name, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear8bitLt)}
    assert int8 and all(model.get_submodule(name).weight.dtype == torch.int8 for name in int8)
    # Every attention projection and the feed-forward input projection are quantised ...
    quantised = {"q", "k", "v", "o", "wi_0", "wi_1"}  # the tiny shape's feed-forward is gated: wi_0, wi_1
    assert {name.rsplit(".", 1)[1] for name in int8} == quantised
    assert len(int8) == sum(1 for name, _ in reference.named_modules() if name.rsplit(".", 1)[-1] in quantised)
    # ... while `wo` (which overflows in 8 bits in T5) and the output projection stay full precision.
    kept = [m for name, m in model.named_modules() if name.endswith(".wo") or name == "lm_head"]
    assert kept and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in kept)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ids = torch.tensor([loaded.tokenizer("abc")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=torch.zeros_like(ids[:, :1])).logits
        expected = reference(input_ids=ids, decoder_input_ids=torch.zeros_like(ids[:, :1])).logits
    # Int8 weights move logits by about 1%; a wrong skip list or dtype moves them far more.
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.99


def test_quantization_without_bitsandbytes_says_how_to_install_it(tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    with pytest.raises(ModelLoadError, match=r"quantization '8bit' needs bitsandbytes.*promptmux\[gpu\]"):
        load_model(ModelConfig(source=str(tiny_checkpoint[0]), quantization="8bit"))


def test_shapes_match_the_published_sizes():
    xxl = shape_config("t5-xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.num_layers, xxl.vocab_size) == (4096, 10240, 64, 24, 32128)
    embedded = build_random_model("embedded")
    assert round(sum(p.numel() for p in embedded.parameters()) / 1e6, 1) == 4.8
    assert set(SHAPES) >= {"tiny", "embedded", "t5-small", "t5-xxl"}
