"""The embedded default model: a 4.8M-parameter byte-level T5 shipped with the project.

Its weights (`assets/embedded-t5.safetensors`, bfloat16) were pretrained on synthetic
string tasks by `python -m promptmux.serving.demo.build`, and load with no download.
The file's sha256 is checked against `assets/embedded-t5.sha256` first: a corrupted or
mismatched file fails with ModelLoadError and is never silently regenerated.
`build_random_model("embedded")` still gives random weights of the same shape.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from transformers import T5ForConditionalGeneration

from promptmux.prompts.errors import ModelLoadError
from .shapes import shape_config

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_WEIGHTS = ASSETS_DIR / "embedded-t5.safetensors"
EMBEDDED_CHECKSUM = ASSETS_DIR / "embedded-t5.sha256"
DEMO_PROMPTS_DIR = ASSETS_DIR / "demo_prompts"
_REBUILD_HINT = (
    "restore the file from the repository (git checkout -- serving/assets) or rebuild both with "
    "`python -m promptmux.serving.demo.build`"
)


def load_embedded_model(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights: Path = EMBEDDED_WEIGHTS,
    checksum: Path = EMBEDDED_CHECKSUM,
) -> T5ForConditionalGeneration:
    """The shipped pretrained weights, verified by sha256, in `dtype` on `device`."""
    data = _read_verified(Path(weights), Path(checksum))
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as error:
        raise ModelLoadError(f"{weights} is not a readable safetensors file ({error}); {_REBUILD_HINT}") from error
    model = model_from_state_dict(state, source=str(weights))
    return model.to(device=device, dtype=dtype).eval()


def model_from_state_dict(state: dict[str, torch.Tensor], *, source: str = "state dict") -> T5ForConditionalGeneration:
    """An `embedded`-shaped T5 holding exactly `state`'s weights (float32 on CPU)."""
    with torch.device("meta"):  # no random init: every weight is overwritten below
        model = T5ForConditionalGeneration(shape_config("embedded"))
    model = model.to_empty(device="cpu").float()
    model.tie_weights()
    expected = embedded_state_dict(model, None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape, e.g. {wrong_shape[:2]}")
        raise ModelLoadError(
            f"{source} does not hold the weights of the `embedded` T5 shape: {'; '.join(problems)}; {_REBUILD_HINT}"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key].float())
    return model


def embedded_state_dict(model: T5ForConditionalGeneration, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every distinct weight once (tied embeddings share one tensor), optionally cast."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach()
        out[key] = tensor.to(dtype).contiguous() if dtype is not None else tensor
    return out


def _read_verified(weights: Path, checksum: Path) -> bytes:
    if not weights.exists():
        raise ModelLoadError(f"the embedded model's weights {str(weights)!r} are missing; {_REBUILD_HINT}")
    if not checksum.exists():
        raise ModelLoadError(f"the checksum file {str(checksum)!r} for the embedded weights is missing; {_REBUILD_HINT}")
    fields = checksum.read_text().split()
    if not fields or len(fields[0]) != 64:
        raise ModelLoadError(
            f"{checksum} does not start with a 64-hex-digit sha256 (got {checksum.read_text()[:80]!r}); {_REBUILD_HINT}"
        )
    data = weights.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != fields[0].lower():
        raise ModelLoadError(
            f"the embedded model's weights {weights} are corrupted or do not match their checksum: "
            f"sha256 is {actual}, {checksum.name} expects {fields[0]}; {_REBUILD_HINT}"
        )
    return data
