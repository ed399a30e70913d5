"""Named T5 shapes, built with random weights and no download.

`embedded` is the project's default model: a byte-level T5 small enough for tests and the
CPU demo. The other shapes give real compute at real scale for benchmarks.

embedded: ByT5 vocabulary (384 ids), d_model 256, d_kv 32, 8 heads, d_ff 512, 3 encoder +
3 decoder layers, gated-gelu, 64 relative-position buckets, max distance 128; about 4.8M
parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import T5Config, T5ForConditionalGeneration

BYT5_VOCAB = 384
T5_VOCAB = 32128
RANDOM_EMBEDDING_STD = 0.05


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    vocab_size: int
    feed_forward_proj: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 16, 4, 128, 2, BYT5_VOCAB),
    "embedded": Shape(256, 32, 8, 512, 3, BYT5_VOCAB, relative_attention_num_buckets=64),
    "t5-small": Shape(512, 64, 8, 2048, 6, T5_VOCAB, feed_forward_proj="relu"),
    "t5-base": Shape(768, 64, 12, 2048, 12, T5_VOCAB),
    "t5-large": Shape(1024, 64, 16, 2816, 24, T5_VOCAB),
    "t5-xl": Shape(2048, 64, 32, 5120, 24, T5_VOCAB),
    "t5-xxl": Shape(4096, 64, 64, 10240, 24, T5_VOCAB),
}


def shape_config(name: str) -> T5Config:
    try:
        shape = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}") from None
    return T5Config(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        d_kv=shape.d_kv,
        d_ff=shape.d_ff,
        num_layers=shape.num_layers,
        num_decoder_layers=shape.num_layers,
        num_heads=shape.num_heads,
        feed_forward_proj=shape.feed_forward_proj,
        relative_attention_num_buckets=shape.relative_attention_num_buckets,
        relative_attention_max_distance=shape.relative_attention_max_distance,
        dropout_rate=0.0,
        # transformers ties T5's input and output embeddings; leaving tie_word_embeddings
        # unset keeps the original T5 rescaling of decoder outputs (d_model ** -0.5), without
        # which a random tied model only ever repeats its decoder input token.
        # ByT5 ids: pad 0, eos 1, unk 2; the decoder starts from pad, as in every T5.
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=True,
    )


def build_random_model(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> T5ForConditionalGeneration:
    """Random weights of a named shape, deterministic for a seed, dtype and device.

    The weights are drawn directly in `dtype` on `device`: an 11B shape built in float32 and
    then cast would need 44 GB of host memory on the way."""
    config = shape_config(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = T5ForConditionalGeneration._from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        # T5 initialises embeddings with std 1.0, which swamps the random layers' outputs in
        # the residual stream: every untrained model would only echo its decoder input. A
        # small embedding lets random weights give varied, input-dependent tokens.
        model.shared.weight.mul_(RANDOM_EMBEDDING_STD)
    init_alibi_position_bias(model)
    return model


# Head designs of the position-bias init: (kind, offset or slope). "at" heads read the token
# `offset` places away, so a position holds its neighbours' tokens and a decoder step holds
# the tokens it just wrote: matching the two finds the next character to copy or reverse,
# and two neighbours tell apart characters that repeat. One-sided heads with slope 0 average
# everything on their side; the dilution tells a token how far it is from the start or end.
_ENCODER_HEADS = (("at", -1), ("at", -2), ("at", 1), ("at", 2),
                  ("left", 0.0), ("right", 0.0), ("both", 0.25), ("both", 0.03))
_DECODER_HEADS = (("at", -1), ("at", -2), ("left", 0.0), ("left", 1.0),
                  ("left", 0.5), ("left", 0.25), ("left", 0.1), ("left", 0.03))
_BLOCKED = -20.0  # a bias that shuts a position out of a head, but stays trainable


def init_alibi_position_bias(model: T5ForConditionalGeneration) -> None:
    """ALiBi-style relative position bias: without it a small random T5 cannot see order.

    Each head gets a design from _ENCODER_HEADS / _DECODER_HEADS (cycled when a shape has
    more heads): heads that read one neighbour, one-sided heads with a linear penalty on
    distance, and symmetric ones. On the synthetic tasks this took `first`/`last` from ~10% to
    ~100% exact match within 100 steps, and `reverse` from 0% to 58% within 400.
    """
    config = model.config
    buckets = config.relative_attention_num_buckets
    for stack, bidirectional, designs in ((model.encoder, True, _ENCODER_HEADS), (model.decoder, False, _DECODER_HEADS)):
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # [buckets, heads]
        distance = _bucket_distances(buckets, config.relative_attention_max_distance, bidirectional)  # [buckets]
        table = torch.stack(
            [_head_bias(distance, *designs[head % len(designs)]) for head in range(bias.shape[1])], dim=1
        )  # [buckets, heads]
        with torch.no_grad():
            bias.copy_(table.to(bias.dtype))


def _head_bias(distance: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """One head's bias per bucket; `distance` is key position minus query position."""
    blocked = torch.full_like(distance, _BLOCKED)
    if kind == "at":
        return torch.where(distance == value, torch.zeros_like(distance), blocked)
    penalty = -value * distance.abs()
    if kind == "left":
        return torch.where(distance <= 0, penalty, blocked)
    if kind == "right":
        return torch.where(distance >= 0, penalty, blocked)
    return penalty  # "both"


def _bucket_distances(buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """A representative signed distance (key - query) for each bucket of T5's scheme."""
    distance = torch.zeros(buckets)
    half = buckets // 2 if bidirectional else buckets
    exact = half // 2
    for b in range(buckets):
        side = b // half if bidirectional else 0
        local = b % half
        if local < exact:
            magnitude = float(local)
        else:
            fraction = (local - exact) / max(half - exact, 1)
            magnitude = exact * math.exp(fraction * math.log(max_distance / exact))
        # Bidirectional: bucket offset `half` means key after query (positive distance).
        sign = 1.0 if (bidirectional and side == 1) else -1.0
        distance[b] = sign * magnitude
    return distance
