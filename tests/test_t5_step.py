"""The decoder step's own projections: packed oneDNN matmuls on a CPU, fused q/k/v and gated
feed-forward GEMMs, and int8 layers. What they must keep: a row's logits do not depend on the
rows that share its step (bit for bit), the model's own modules compute what they computed
before, and int8 stays close to float."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from promptmux.serving.config import ModelConfig
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.step.executor import StepExecutor
from promptmux.serving.engine.step.t5_step import projection
from promptmux.serving.engine.types import GenerationParams, GenerationRequest
from promptmux.serving.model.int8 import Int8Linear, quantize_int8
from promptmux.serving.model.packed import PackedLinear, PackedMatmul, pack_linears, packs_on_cpu
from promptmux.serving.model.shapes import build_random_model


def test_packed_linear_rows_do_not_depend_on_their_batch_mates():
    if not packs_on_cpu(torch.zeros(1)):
        pytest.skip("oneDNN is not available in this torch build")
    torch.manual_seed(0)
    weight, x = torch.randn(300, 96), torch.randn(37, 96)
    packed = PackedMatmul(weight)
    full = packed(x)  # [37, 300]
    for rows in ([0], [5, 6, 7], list(range(17)), [36, 2, 11]):
        assert torch.equal(packed(x[rows]), full[rows]), rows
    assert torch.allclose(full, nn.functional.linear(x, weight), atol=1e-4, rtol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(packed(x), full)
    finally:
        torch.set_num_threads(threads)


def test_a_projection_of_several_layers_computes_each_of_them():
    torch.manual_seed(1)
    layers = [nn.Linear(48, n, bias=False) for n in (48, 48, 20)]
    x = torch.randn(9, 48)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    fused = projection(layers)
    assert torch.allclose(fused(x), separate, atol=1e-5)
    assert all(layer.weight.shape == (n, 48) for layer, n in zip(layers, (48, 48, 20)))
    int8 = [Int8Linear.from_linear(layer) for layer in layers]
    alone = torch.cat([layer(x) for layer in int8], dim=-1)
    together = projection(int8)
    assert torch.equal(together(x), alone)  # the same int8 weights, scales and per-row sums
    assert torch.equal(torch.cat([layer(x) for layer in int8], dim=-1), alone)  # the layers still work (views)


def test_packed_layers_keep_their_weight_for_gradients_and_state_dicts():
    if not packs_on_cpu(torch.zeros(1)):
        pytest.skip("oneDNN is not available in this torch build")
    model = build_random_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.inference_mode():
        plain = model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == linears
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the same parameters
    with torch.inference_mode():
        packed = model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    assert torch.allclose(packed, plain, atol=1e-4)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # prompt tuning's path
    model(inputs_embeds=embeds, decoder_input_ids=ids[:, :2]).logits.sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()


def test_int8_rows_are_independent_and_close_to_float():
    torch.manual_seed(2)
    linear = nn.Linear(64, 40, bias=False)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(12, 64)
    x[3] *= 50  # one row with a much larger range must not change the others' quantisation
    out = int8(x)
    for row in range(12):
        assert torch.equal(int8(x[row : row + 1]), out[row : row + 1])
    reference = linear(x)
    error = (out - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert float(error.max()) < 0.02, error
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear.from_linear(nn.Linear(4, 4, bias=True))


def test_int8_layers_pass_gradients_for_prompt_tuning():
    torch.manual_seed(3)
    linear = nn.Linear(16, 8, bias=False)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(4, 16, requires_grad=True)
    int8(x).sum().backward()
    expected = (int8.weight.float() * int8.scale[:, None]).sum(0).expand(4, 16)
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_quantize_int8_replaces_every_linear_and_the_model_still_decodes():
    model = build_random_model("tiny", seed=0)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_int8(model) == linears
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.tensor([[5, 6, 7, 1]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5)


def test_an_unknown_quantization_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"model.quantization='int4' is unknown; expected one of"):
        ModelConfig(quantization="int4")


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_row_steps_to_the_same_tokens_alone_and_in_a_full_step(tmp_path, quantization):
    """The step loop's logits for a row are the same bits whatever shares its step, so the
    row's tokens are too: alone, in a full step, and in a step of another order."""
    from promptmux.prompts.store import PromptStore
    from promptmux.serving.config import EngineConfig
    from promptmux.serving.engine.core import Engine
    from promptmux.serving.model.loading import load_model

    loaded = load_model(ModelConfig(source="random:embedded", quantization=quantization))
    store = PromptStore(tmp_path, d_model=loaded.d_model, max_length=64)
    generator = torch.Generator().manual_seed(4)
    for task in ("a", "b", "c"):
        store.register("acme", task, 0.05 * torch.randn(7, loaded.d_model, generator=generator))
    engine = Engine(loaded, store, EngineConfig(max_batch_size=8, max_new_tokens_limit=16))
    rng = random.Random(4)
    requests = [engine.prepare(GenerationRequest(
        tenant="acme", task=rng.choice("abc"), params=GenerationParams(max_new_tokens=16),
        text="".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 20))))) for _ in range(8)]

    def tokens(items):
        executor = StepExecutor(engine.context)
        done = dict(executor.execute(StepPlan(admit=tuple(items))).finished)
        while executor.active_slots:
            done.update(executor.execute(StepPlan()).finished)
        return {handle: result.token_ids for handle, result in done.items()}

    full = tokens(list(enumerate(requests)))
    backwards = tokens(list(enumerate(requests))[::-1])
    assert backwards == full
    for handle, request in enumerate(requests):
        assert tokens([(handle, request)]) == {handle: full[handle]}
