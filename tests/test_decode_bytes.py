"""The bytes a decode step reads: pinned on the T5-XXL shape, built on the meta device."""
from __future__ import annotations

import pytest
import torch

from promptmux.benchmarks.harness.decode_bytes import decode_step_bytes
from promptmux.serving.model.shapes import SHAPES, build_random_model

XXL = SHAPES["t5-xxl"]
BF16 = 2
ENCODER_LENGTH = 229  # prompt 100 + 128 input bytes + EOS: the GPU benchmark's default rows


@pytest.fixture(scope="module")
def xxl():
    """T5-XXL in bf16 with no storage: shapes, dtypes and ties only."""
    return build_random_model("t5-xxl", dtype=torch.bfloat16, device="meta")


def test_xxl_decode_step_bytes_from_the_shape(xxl):
    d, inner, ff, layers, vocab = XXL.d_model, XXL.num_heads * XXL.d_kv, XXL.d_ff, XXL.num_layers, XXL.vocab_size
    attention = 4 * d * inner  # q, k, v, o
    feed_forward = 3 * d * ff  # gated-gelu: wi_0, wi_1, wo
    decoder_layer = 2 * attention + feed_forward + 3 * d  # self + cross attention, FFN, three norms
    # Layers, the self-attention position bias, the final norm and lm_head (tied to the input
    # embedding, which is therefore counted once, as the output projection).
    decoder = layers * decoder_layer + XXL.relative_attention_num_buckets * XXL.num_heads + d + vocab * d
    accounting = decode_step_bytes(xxl, ENCODER_LENGTH)

    assert accounting.decoder_weight_bytes == decoder * BF16 == 12_746_043_392
    assert accounting.cross_kv_weight_bytes == layers * 2 * d * inner * BF16 == 1_610_612_736
    assert accounting.weight_bytes_per_step == 11_135_430_656
    # One row's caches: K and V per layer, inner = heads x d_kv wide.
    assert accounting.self_cache_bytes_per_position == 2 * layers * inner * BF16 == 393_216
    assert accounting.cross_cache_bytes_per_row == ENCODER_LENGTH * 393_216 == 90_046_464  # ~90 MB per row
    mean_self = sum(accounting.self_cache_bytes_per_position * t for t in range(2, 65)) / 63
    assert mean_self == pytest.approx(13e6, rel=0.01)  # ~13 MB per row per step over 64 new tokens

    # bytes(step) = decoder weights - cross K/V projections + batch x (cross cache + step x self)
    assert accounting.step_bytes(64, 33) == 11_135_430_656 + 64 * (90_046_464 + 33 * 393_216)
    assert accounting.step_bytes(1, 2) == 11_135_430_656 + 90_046_464 + 2 * 393_216
    assert accounting.decode_bytes(64, 64) == sum(accounting.step_bytes(64, t) for t in range(2, 65))


def test_bound_counts_the_caches_of_every_row(xxl):
    accounting = decode_step_bytes(xxl, ENCODER_LENGTH)
    bandwidth = 4800.0  # GB/s, an H200's nominal figure
    weights_only = 64 * bandwidth * 1e9 / accounting.weight_bytes_per_step
    bound = accounting.bound_tokens_per_s(64, 64, bandwidth)
    expected = 64 * 63 / (accounting.decode_bytes(64, 64) / (bandwidth * 1e9))
    assert bound == pytest.approx(expected)
    # At 64 rows the caches add about 60% to the weights: the bound drops accordingly.
    assert bound / weights_only == pytest.approx(0.63, abs=0.01)
    # One row reads almost only weights.
    assert accounting.bound_tokens_per_s(1, 64, bandwidth) == pytest.approx(bandwidth * 1e9 / accounting.weight_bytes_per_step, rel=0.02)


def test_step_one_and_a_single_token_are_refused(xxl):
    accounting = decode_step_bytes(xxl, ENCODER_LENGTH)
    with pytest.raises(ValueError, match="step 1: the byte count holds from step 2 on"):
        accounting.step_bytes(8, 1)
    with pytest.raises(ValueError, match="needs at least 2 new tokens"):
        accounting.bound_tokens_per_s(8, 1, 4800.0)


def test_cache_bytes_follow_the_dtype():
    fp32 = decode_step_bytes(build_random_model("tiny", device="meta"), encoder_length=10)
    tiny = SHAPES["tiny"]
    assert fp32.self_cache_bytes_per_position == 2 * tiny.num_layers * tiny.num_heads * tiny.d_kv * 4
    assert fp32.cross_cache_bytes_per_row == 10 * fp32.self_cache_bytes_per_position
