"""int8 weights for a CPU replica (`model.quantization: int8`).

Each `nn.Linear` of the encoder, the decoder and the LM head becomes an `Int8Linear`: its
weight is stored as int8 with one float scale per output channel (symmetric, absmax), and each
call quantises its input per row (per token) with that row's own absmax, multiplies in int8
with int32 accumulation (`torch._int_mm`, oneDNN/VNNI on x86), and scales back to float.

Chosen by measurement on the project's 2-core AVX-512 CPU (benchmarks/results/, the decode
report): PyTorch's dynamic quantization of `nn.Linear` (fbgemm) was as fast but scales each
call's input per *tensor*, so a row's output would depend on its batch-mates' largest value;
torchao's int8 configs ran 5-10x slower than fp32 without torch.compile; bitsandbytes' int8
is a GPU path. Per-row scales keep a row's result independent of the rest of its batch, and
int32 sums are exact, so a mixed row still equals the request alone.
"""
from __future__ import annotations

import torch
from torch import nn

# Quantise every Linear except these (by attribute name): none by default. T5 checkpoints whose
# feed-forward output overflows in 8 bits (flan-t5-xxl's `wo`) can list "wo" here.
INT8_SKIP: tuple[str, ...] = ()


class Int8Linear(nn.Module):
    """y = x W^T with W in int8 (per output channel scale) and x quantised per row."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] float32: weight = int8 * scale

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free Linear layers (T5 has none)")
        weight = linear.weight.detach().float()  # [N, K]
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # [N]
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(quantized, scale)

    @classmethod
    def concat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing all of `layers` side by side (outputs concatenated)."""
        return cls(torch.cat([layer.weight for layer in layers]), torch.cat([layer.scale for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # Prompt tuning on this model (task embeddings, SimilarTasks) needs gradients through
            # the layer: the dequantised weight gives them (int8 rounding has none).
            return torch.nn.functional.linear(x, (self.weight.float() * self.scale[:, None]).to(x.dtype))
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()  # [M, K]
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # [M, 1]
        quantized = torch.round(rows / row_scale).clamp(-127, 127).to(torch.int8)  # [M, K]
        acc = torch._int_mm(quantized, self.weight.t())  # [M, N] int32, exact
        out = acc.float() * row_scale * self.scale  # [M, N]
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel weights"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = INT8_SKIP) -> int:
    """Replace every bias-free `nn.Linear` of `model` by an `Int8Linear`, in place. Returns how
    many were replaced. Embeddings and layer norms stay in float."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and name not in skip:
                setattr(parent, name, Int8Linear.from_linear(child))
                replaced += 1
    return replaced
