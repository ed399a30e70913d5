"""Linear layers that multiply through oneDNN over a packed copy of their weight, on a CPU.

On the project's AVX-512 CPU, oneDNN's matmul over weights reordered once for it
(`torch.ops.mkldnn`) ran T5's projections 1.0-1.8x faster than the default GEMM, at the
encoder's shapes (thousands of rows) and the decoder's (one row per request), and a row's
output bits do not depend on how many rows share the call (checked in tests/test_t5_step.py).
`model.packed_weights` (default on) replaces every bias-free `nn.Linear` of a float model on a
CPU by a `PackedLinear` at load time. The float weight stays, as the layer's parameter: a call
that needs gradients (prompt tuning, task embeddings) multiplies by it as `nn.Linear` does, and
state dicts, `save_pretrained` and transformers' checks see the usual layer. The cost is the
packed copy: a second set of weights in memory.
"""
from __future__ import annotations

import torch
from torch import nn

ROWS_HINT = 64  # oneDNN's reorder wants a row count; measured: it barely matters (1 to 3,328 rows)


def packs_on_cpu(weight: torch.Tensor) -> bool:
    """Whether oneDNN serves this weight: a float weight on a CPU, with oneDNN built in."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class PackedMatmul:
    """x W^T over W packed once for oneDNN; holds no float copy of W."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [None], "")  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose inference calls run oneDNN over a packed copy of its weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        if linear.bias is not None:
            raise ValueError("PackedLinear takes bias-free Linear layers (T5 has none)")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", None)
        layer._packed = PackedMatmul(linear.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return nn.functional.linear(x, self.weight)
        return self._packed(x)


def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free float `nn.Linear` of `model` on a CPU by a `PackedLinear`, in
    place. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and packs_on_cpu(child.weight):
                setattr(parent, name, PackedLinear.from_linear(child))
                replaced += 1
    return replaced
