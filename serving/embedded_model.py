"""The embedded default model: built locally, no files or network needed."""
from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from .model_shapes import build_random_model

EMBEDDED_SEED = 0


def load_embedded_model(*, dtype: torch.dtype = torch.float32, device: str = "cpu") -> T5ForConditionalGeneration:
    # Built on CPU in float32 so the weights are identical on every machine, then moved.
    model = build_random_model("embedded", seed=EMBEDDED_SEED)
    return model.to(device=device, dtype=dtype)
