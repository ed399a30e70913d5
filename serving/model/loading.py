"""Load the frozen T5: the embedded default, a named random shape, or a local checkpoint.

No hub download ever happens: checkpoints are read from a local directory with
`local_files_only=True`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration

from ..config import ModelConfig
from promptmux.prompts.errors import ModelLoadError
from .shapes import SHAPES, build_random_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: T5ForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def load_model(config: ModelConfig) -> LoadedModel:
    if config.dtype not in DTYPES:
        raise ModelLoadError(
            f"dtype {config.dtype!r} is not supported; use 'float32' or 'bfloat16' (T5 overflows in float16)"
        )
    dtype = DTYPES[config.dtype]
    if config.source == "embedded":
        model, name = _load_embedded(config, dtype), "embedded"
        tokenizer = ByT5Tokenizer()
    elif config.source.startswith("random:"):
        shape = config.source.removeprefix("random:")
        if shape not in SHAPES:
            raise ModelLoadError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
        model = build_random_model(shape, seed=config.seed, dtype=dtype, device=config.device)
        tokenizer, name = ByT5Tokenizer(), config.source
    else:
        model, tokenizer = _load_checkpoint(Path(config.source), config, dtype)
        name = config.source
    model.eval()
    model.requires_grad_(False)
    if config.quantization == "int8":
        _quantize_int8(model, config)
    elif config.packed_weights and config.quantization == "none":
        from .packed import pack_linears

        pack_linears(model)  # CPU float layers only; a GPU model is left as it is
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def _quantize_int8(model: T5ForConditionalGeneration, config: ModelConfig) -> None:
    """`quantization: int8`, the CPU path: every Linear's weight in int8 (serving/model/int8.py)."""
    from .int8 import quantize_int8

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ModelLoadError(
            f"quantization 'int8' runs on a CPU, but the model is on {device}; on a GPU use '8bit' or '4bit' "
            "(bitsandbytes), or set model.device: cpu"
        )
    quantize_int8(model)


def model_d_model(config: ModelConfig) -> int:
    """The model's d_model without loading its weights (prompt commands need only this)."""
    if config.source == "embedded":
        return SHAPES["embedded"].d_model
    if config.source.startswith("random:"):
        shape = config.source.removeprefix("random:")
        if shape not in SHAPES:
            raise ModelLoadError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
        return SHAPES[shape].d_model
    config_path = Path(config.source) / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"model directory {config.source!r} has no config.json")
    return int(json.loads(config_path.read_text())["d_model"])


def _load_embedded(config: ModelConfig, dtype: torch.dtype) -> T5ForConditionalGeneration:
    from .embedded import load_embedded_model

    return load_embedded_model(dtype=dtype, device=config.device)


def _load_checkpoint(path: Path, config: ModelConfig, dtype: torch.dtype):
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"model directory {str(path)!r} has no config.json; expected a local T5-family checkpoint "
            "(T5 1.1, Flan-T5, mT5 or ByT5) saved with save_pretrained, or use source 'embedded' "
            "or 'random:<shape>'"
        )
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if config.device_map is not None:
        kwargs["device_map"] = config.device_map
        if config.max_memory:
            kwargs["max_memory"] = {_device_key(k): v for k, v in config.max_memory.items()}
    if config.quantization in ("8bit", "4bit"):
        kwargs["quantization_config"] = _quantization_config(config.quantization, dtype)
        kwargs.setdefault("device_map", "auto")
    try:
        model = T5ForConditionalGeneration.from_pretrained(path, **kwargs)
    except Exception as error:  # transformers raises many types; one clear message for all
        raise ModelLoadError(f"could not load a T5 checkpoint from {str(path)!r}: {error}") from error
    if config.device_map is None and config.quantization in ("none", "int8"):
        model.to(config.device)
    if any((path / name).exists() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = ByT5Tokenizer()  # ByT5 needs no vocabulary file
        if model.config.vocab_size != len(tokenizer):
            raise ModelLoadError(
                f"no tokenizer files in {str(path)!r} and the model's vocabulary ({model.config.vocab_size}) "
                "is not ByT5's; save the tokenizer next to the weights (tokenizer.save_pretrained)"
            )
    return model, tokenizer


def _quantization_config(kind: str, dtype: torch.dtype):
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(
            f"quantization {kind!r} needs bitsandbytes and a CUDA GPU; install promptmux[gpu]"
        ) from error
    if kind == "8bit":
        # T5's feed-forward output projection overflows when quantised; keep it in full precision.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["wo", "lm_head"])
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["wo", "lm_head"])
    raise ModelLoadError(f"unknown quantization {kind!r}; expected 'none', '8bit', '4bit' or 'int8' (CPU)")


def _device_key(key: str):
    return int(key) if key.isdigit() else key
