"""T5 attention through SDPA with ONE float bias: relative position bias + padding mask.

T5 adds a learned relative position bias to the attention scores and does not scale them by
1/sqrt(d_kv). HF's eager path adds the bias and then the mask to a materialised [B, H, Q, K]
score tensor in every layer, then runs softmax and a second matmul. Here the two are merged
once into a single additive bias and handed to `torch.nn.functional.scaled_dot_product_attention`
with `scale=1.0`, which can use its fused kernels.

T5 computes the position bias in layer 0 and passes the very same tensor to every later
layer of the stack, and the mask object is shared as well. So the merged bias is built once
per stack forward and stored on the position-bias tensor itself: it lives exactly as long as
that forward does, with no state kept between forwards or shared across threads.

Usage:
    model = build_random_model("t5-small")
    install_t5_bias_attention(model)   # every T5Attention now runs T5_BIAS_ATTENTION, or it raises
    set_t5_attention(model, "eager")   # back to HF's eager path, again on every attention module

Switch a T5 model's attention with `set_t5_attention`, not `model.set_attn_implementation`:
before about transformers 5.2x, the latter changes only the top-level config, and the encoder
and decoder stacks (each with its own config copy) silently keep their old implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.mt5.modeling_mt5 import MT5Attention
from transformers.models.t5.modeling_t5 import T5Attention

T5_BIAS_ATTENTION = "promptmux_t5_bias"

# Attribute on the position-bias tensor that holds (mask it was merged with, merged bias).
_MERGED_ATTR = "_promptmux_merged_bias"


def merge_position_bias_and_mask(
    position_bias: torch.Tensor,  # [1 or B, H, Q, K] float
    attention_mask: torch.Tensor | None,  # None, bool [B, 1, Q, K] (True = attend) or additive float
    query_length: int,
    key_length: int,
    is_causal: bool,
) -> torch.Tensor:
    """One additive float bias: the position bias where attending is allowed, dtype-min elsewhere.

    dtype-min rather than -inf: a row with nothing to attend to (an empty request) then gets a
    uniform softmax, exactly like HF's eager path, instead of NaN.
    """
    masked = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not (is_causal and query_length > 1):
            return position_bias
        # No mask object means "causal only" here; keys after the query's own position are
        # hidden, aligned to the end when a cache prefix makes K > Q.
        shift = key_length - query_length
        q = torch.arange(query_length, device=position_bias.device)[:, None]  # [Q, 1]
        k = torch.arange(key_length, device=position_bias.device)[None, :]  # [1, K]
        attention_mask = (k <= q + shift)[None, None]  # [1, 1, Q, K]
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, masked)  # [B, H, Q, K]
    return position_bias + attention_mask.to(position_bias.dtype)  # [B, H, Q, K]


def t5_bias_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, Q, d_kv]
    key: torch.Tensor,  # [B, H, K, d_kv]
    value: torch.Tensor,  # [B, H, K, d_kv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function for T5: merged bias (cached per stack forward) + SDPA."""
    if position_bias is None:
        raise ValueError(
            f"{T5_BIAS_ATTENTION} attention expects T5's position_bias argument (got None); it only "
            "serves T5-family attention modules. Use attn_implementation='sdpa' or 'eager' for other models"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"{T5_BIAS_ATTENTION} attention cannot return attention weights (SDPA never forms them); "
            "call set_t5_attention(model, 'eager') to get output_attentions"
        )
    query_length, key_length = query.shape[2], key.shape[2]
    cached = getattr(position_bias, _MERGED_ATTR, None)
    if cached is not None and cached[0] is attention_mask:
        bias = cached[1]
    else:
        bias = merge_position_bias_and_mask(
            position_bias, attention_mask, query_length, key_length, getattr(module, "is_causal", False)
        )
        bias = bias.to(query.dtype)
        # Every later layer of this stack forward passes the same position_bias and mask objects.
        setattr(position_bias, _MERGED_ATTR, (attention_mask, bias))
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=bias,
        dropout_p=dropout,
        # T5 never scales scores by 1/sqrt(d_kv); its T5Attention passes scaling=1.0.
        scale=1.0 if scaling is None else scaling,
    )  # [B, H, Q, d_kv]
    return out.transpose(1, 2).contiguous(), None  # [B, Q, H, d_kv]


def _require_t5(model: PreTrainedModel, caller: str) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ("t5", "mt5"):
        raise ValueError(
            f"{caller} needs a T5-family model (model_type t5 or mt5), got "
            f"{type(model).__name__} with model_type={model_type!r}"
        )


def t5_attention_paths(model: torch.nn.Module) -> dict[str, str | None]:
    """The implementation each T5/mT5 attention module will call, by module name.

    T5Attention looks its function up from its own `config._attn_implementation` at every
    forward, so this is exactly the path each module takes.
    """
    return {
        name: module.config._attn_implementation
        for name, module in model.named_modules()
        if isinstance(module, (T5Attention, MT5Attention))
    }


def assert_t5_attention(model: torch.nn.Module, implementation: str) -> None:
    """Raise unless EVERY T5 attention module (encoder, decoder self and cross) uses `implementation`."""
    paths = t5_attention_paths(model)
    if not paths:
        raise RuntimeError(
            f"expected T5 attention modules to run {implementation!r}, but {type(model).__name__} has no "
            "T5Attention/MT5Attention module; only T5-family models can be checked"
        )
    wrong = {name: path for name, path in paths.items() if path != implementation}
    if wrong:
        shown = ", ".join(f"{name}={path!r}" for name, path in list(wrong.items())[:4])
        raise RuntimeError(
            f"{len(wrong)} of {len(paths)} T5 attention modules are not on {implementation!r} (e.g. {shown}) "
            f"under transformers {transformers.__version__}. Switch with set_t5_attention(model, ...), which "
            "sets every config the model's modules hold; model.set_attn_implementation alone misses the "
            "encoder and decoder configs on some transformers versions"
        )


def set_t5_attention(model: PreTrainedModel, implementation: str) -> PreTrainedModel:
    """Switch every attention module of a T5-family model to `implementation`, and check it.

    `implementation` is "eager", "sdpa" or a registered name such as T5_BIAS_ATTENTION.
    """
    _require_t5(model, "set_t5_attention")
    model.set_attn_implementation(implementation)
    # Older transformers (5.17, for one) stop at the top-level config: the encoder and decoder
    # stacks hold their own config copies, which their attention modules and mask builders read.
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    for config in configs.values():
        if config._attn_implementation != implementation:
            config._attn_implementation = implementation
    assert_t5_attention(model, implementation)
    return model


def install_t5_bias_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Route every attention layer of a loaded T5, T5 1.1 or mT5 model through the merged bias.

    Registers the attention function and a boolean mask builder under T5_BIAS_ATTENTION, then
    switches the model (encoder, decoder and all their configs) to it. Raises if any attention
    module is left on another path. Returns the model.
    """
    _require_t5(model, "install_t5_bias_attention")
    AttentionInterface.register(T5_BIAS_ATTENTION, t5_bias_attention_forward)
    # Boolean masks (or None when nothing is padded), merged above into the float bias.
    AttentionMaskInterface.register(T5_BIAS_ATTENTION, sdpa_mask)
    return set_t5_attention(model, T5_BIAS_ATTENTION)
