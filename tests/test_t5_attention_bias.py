"""T5 attention through SDPA with one merged bias equals HF's eager T5 attention."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from promptmux.kernels import t5_attention_bias
from promptmux.kernels.t5_attention_bias import (
    T5_BIAS_ATTENTION,
    assert_t5_attention,
    install_t5_bias_attention,
    merge_position_bias_and_mask,
    set_t5_attention,
    t5_attention_paths,
)
from promptmux.serving.model.shapes import build_random_model


@pytest.fixture(scope="module")
def model():
    return build_random_model("embedded", seed=3).eval()


def padded_mixed_batch(d_model: int, lengths: list[int], seq_len: int, seed: int = 0):
    """[prompt; input; zeros] rows of different lengths, as the engine builds them."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(lengths), seq_len, d_model, generator=gen)  # [B, S, D]
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, S]
    return embeds * mask[..., None], mask


def run_both(model, fn):
    """fn(model) under eager attention, then under the merged-bias attention.

    Each side checks the path of every attention module (encoder self, decoder self and
    cross), so the comparison can never quietly be sdpa against sdpa.
    """
    set_t5_attention(model, "eager")
    assert set(t5_attention_paths(model).values()) == {"eager"}
    with torch.inference_mode():
        expected = fn(model)
    install_t5_bias_attention(model)
    assert set(t5_attention_paths(model).values()) == {T5_BIAS_ATTENTION}
    try:
        with torch.inference_mode():
            actual = fn(model)
    finally:
        set_t5_attention(model, "eager")
    return expected, actual


def test_encoder_hidden_states_match_eager_on_padded_batch(model):
    embeds, mask = padded_mixed_batch(model.config.d_model, [40, 17, 1, 33], seq_len=40)
    expected, actual = run_both(model, lambda m: m.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_encoder_row_with_nothing_to_attend_matches_eager_without_nan(model):
    """An empty request (no prompt, no tokens) gives a uniform softmax in eager; same here."""
    embeds, mask = padded_mixed_batch(model.config.d_model, [0, 12], seq_len=12)
    expected, actual = run_both(model, lambda m: m.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_eager_on_padded_batch(model):
    embeds, mask = padded_mixed_batch(model.config.d_model, [30, 9, 22], seq_len=30, seed=1)

    def generate(m):
        return m.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False)

    expected, actual = run_both(model, generate)
    assert expected.shape[1] > 1
    assert torch.equal(actual, expected)


def test_decoder_without_cache_keeps_causal_masking(model):
    """Teacher forcing: the decoder's self-attention gets no mask object and must stay causal."""
    embeds, mask = padded_mixed_batch(model.config.d_model, [16, 5], seq_len=16, seed=2)
    decoder_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))

    def logits(m):
        return m(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False).logits

    expected, actual = run_both(model, logits)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_merged_bias_is_built_once_per_stack_forward(model, monkeypatch):
    calls = []
    real_merge = t5_attention_bias.merge_position_bias_and_mask

    def counting_merge(*args, **kwargs):
        calls.append(args[2:4])  # (Q, K)
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(t5_attention_bias, "merge_position_bias_and_mask", counting_merge)
    embeds, mask = padded_mixed_batch(model.config.d_model, [10, 4], seq_len=10)
    install_t5_bias_attention(model)
    try:
        with torch.inference_mode():
            model.encoder(inputs_embeds=embeds, attention_mask=mask)
            assert model.config.num_layers > 1
            assert calls == [(10, 10)]  # one merge for all encoder layers
            model.encoder(inputs_embeds=embeds, attention_mask=mask)
            assert calls == [(10, 10), (10, 10)]  # nothing carried over between forwards
    finally:
        set_t5_attention(model, "eager")


def top_level_only_set_attn_implementation(self, implementation, **kwargs):
    """What `set_attn_implementation` does in transformers 5.17: the top-level config only."""
    self.config._attn_implementation_internal = implementation


def test_install_reaches_every_attention_module_even_when_transformers_sets_only_the_top_config(monkeypatch):
    model = build_random_model("embedded", seed=4).eval()
    monkeypatch.setattr(type(model), "set_attn_implementation", top_level_only_set_attn_implementation)
    install_t5_bias_attention(model)
    paths = t5_attention_paths(model)
    layers = model.config.num_layers + 2 * model.config.num_decoder_layers  # encoder self; decoder self + cross
    assert len(paths) == layers
    assert any(name.startswith("encoder.") for name in paths) and any(name.startswith("decoder.") for name in paths)
    assert set(paths.values()) == {T5_BIAS_ATTENTION}
    assert model.encoder.config._attn_implementation == model.decoder.config._attn_implementation == T5_BIAS_ATTENTION


def test_a_stack_left_on_another_path_fails_loudly():
    model = build_random_model("embedded", seed=4).eval()
    install_t5_bias_attention(model)
    model.decoder.config._attn_implementation_internal = "sdpa"  # as 5.17 leaves the decoder
    with pytest.raises(RuntimeError, match=r"\d+ of \d+ T5 attention modules are not on 'promptmux_t5_bias'.*decoder"):
        assert_t5_attention(model, T5_BIAS_ATTENTION)


def test_merge_keeps_position_bias_where_allowed_and_dtype_min_elsewhere():
    position_bias = torch.randn(1, 2, 3, 3)  # [1, H, Q, K]
    allowed = torch.tensor([[True, True, False], [True, False, False]])[:, None, None, :]  # [B, 1, 1, K]
    merged = merge_position_bias_and_mask(position_bias, allowed, 3, 3, is_causal=False)
    assert merged.shape == (2, 2, 3, 3)
    assert torch.equal(merged[0, :, :, :2], position_bias[0, :, :, :2])
    assert torch.equal(merged[1, :, :, 1:], torch.full((2, 3, 2), torch.finfo(torch.float32).min))
    decode_bias = torch.randn(1, 2, 2, 3)  # [1, H, Q=2, K=3]: a cache prefix of one key
    causal = merge_position_bias_and_mask(decode_bias, None, 2, 3, is_causal=True)
    visible = causal > torch.finfo(torch.float32).min
    assert visible[0, 0].tolist() == [[True, True, False], [True, True, True]]
    assert merge_position_bias_and_mask(position_bias, None, 3, 3, is_causal=False) is position_bias


def test_install_refuses_a_non_t5_model():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="needs a T5-family model.*model_type='bert'"):
        install_t5_bias_attention(bert)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_merged_bias_on_every_module_and_equal_to_eager_in_fp32():
    model = build_random_model("t5-small", seed=5, device="cuda").eval()
    embeds, mask = padded_mixed_batch(model.config.d_model, [60, 17, 1, 44], seq_len=60, seed=5)
    embeds, mask = embeds.cuda(), mask.cuda()

    def generate(m):
        return m.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Exact token equality needs the same arithmetic: no TF32, and SDPA's math kernel.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            expected, actual = run_both(model, generate)  # checks every module's path on both sides
        # The fused kernels SDPA picks by default: equal up to their rounding.
        encoder = lambda m: m.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # noqa: E731
        eager_hidden, fused_hidden = run_both(model, encoder)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert expected.shape == (4, 17)
    assert torch.equal(actual, expected)
    torch.testing.assert_close(fused_hidden, eager_hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_merged_bias_runs_every_module_without_nan():
    model = build_random_model("t5-small", seed=6, dtype=torch.bfloat16, device="cuda").eval()
    install_t5_bias_attention(model)
    assert set(t5_attention_paths(model).values()) == {T5_BIAS_ATTENTION}
    embeds, mask = padded_mixed_batch(model.config.d_model, [40, 0, 12], seq_len=40, seed=6)
    with torch.inference_mode():
        hidden = model.encoder(inputs_embeds=embeds.cuda().bfloat16(), attention_mask=mask.cuda()).last_hidden_state
    assert hidden.dtype == torch.bfloat16 and not torch.isnan(hidden).any()
