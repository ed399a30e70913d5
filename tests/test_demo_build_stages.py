"""The demo build's training stages: each writes a checkpoint that a later build reuses only
when its recorded settings match, so retraining the prompts never silently trains on stale
weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from promptmux.serving.demo.build import PRETRAINING, REFINEMENT, BuildConfig, parse_args, run_stages
from promptmux.serving.model.embedded import embedded_state_dict


def _tiny_build(tmp_path, **changes) -> BuildConfig:
    stages = (dataclasses.replace(PRETRAINING, steps=2, warmup_steps=1),
              dataclasses.replace(REFINEMENT, steps=2, warmup_steps=1))
    return BuildConfig(stages=stages, batch_size=4, eval_every=2, eval_per_task=1, work_dir=tmp_path,
                       progress=False, reuse_checkpoints=True, **changes)


def _weights(model) -> dict[str, torch.Tensor]:
    return embedded_state_dict(model, torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def test_stages_write_checkpoints_that_a_matching_build_reuses(tmp_path, tokenizer):
    config = _tiny_build(tmp_path)
    trained, runs = run_stages(config, tokenizer, log=lambda message: None)
    assert [run.stage.name for run in runs] == ["pretraining", "refinement"]
    assert not any(run.reused for run in runs)
    assert all(run.history[-1]["step"] == 2 and run.history[-1]["stage"] == run.stage.name for run in runs)
    assert (tmp_path / "pretraining.safetensors").exists() and (tmp_path / "refinement.safetensors").exists()

    messages = []
    reused, again = run_stages(config, tokenizer, log=messages.append)
    assert all(run.reused for run in again)
    assert [run.history for run in again] == [run.history for run in runs]
    assert [run.stage for run in again] == [run.stage for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(_weights(trained).values(), _weights(reused).values()))
    assert any("reusing" in message for message in messages)


def test_a_stage_with_other_settings_trains_again_from_the_reused_stage_before_it(tmp_path, tokenizer):
    config = _tiny_build(tmp_path)
    run_stages(config, tokenizer, log=lambda message: None)
    changed = dataclasses.replace(config, stages=(config.stages[0], dataclasses.replace(config.stages[1], lr=1e-5)))
    messages = []
    _, runs = run_stages(changed, tokenizer, log=messages.append)
    assert [run.reused for run in runs] == [True, False]
    assert any("written by other settings" in message for message in messages)
    # A change upstream invalidates every stage after it.
    upstream = dataclasses.replace(config, stages=(dataclasses.replace(config.stages[0], data_seed=9), config.stages[1]))
    _, runs = run_stages(upstream, tokenizer, log=lambda message: None)
    assert [run.reused for run in runs] == [False, False]


def test_cli_sets_stage_steps_and_can_skip_refinement():
    config = parse_args(["--pretrain-steps", "10", "--refine-steps", "0", "--reuse-checkpoints"])
    assert [(stage.name, stage.steps) for stage in config.stages] == [("pretraining", 10)]
    assert config.reuse_checkpoints
    assert [stage.steps for stage in parse_args([]).stages] == [PRETRAINING.steps, REFINEMENT.steps]
