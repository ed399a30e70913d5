"""Factorized prompts (Vu et al., EMNLP 2022): language and task prompts trained jointly.

Every training row belongs to one (language, task) pair; its prompt is the concatenation
`[language prompt; task prompt]`, in that order, in front of its input. One batch mixes
pairs, so each language prompt learns from every task it was paired with and vice versa.
At inference any language composes with any task, including pairs never trained together:
a request names the language prompt and the task prompt as two segments (the
GenerateRequest `language` and `task` fields), which the engine concatenates exactly so.

Data: JSONL rows of `{"language": ..., "task": ..., "input": ..., "target": ...}`.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from promptmux.prompts.errors import InvalidRequestError

from .synthetic_tasks import Example
from .tuning import SCHEDULES, VOCAB_INIT_TOP_TOKENS, Schedule, encode_batch, evaluate, lr_factor, prompt_loss, text_prompt

Pair = tuple[str, str]  # (language, task)


@dataclass(frozen=True)
class FactorizedConfig:
    tenant: str
    language_length: int = 12
    task_length: int = 12
    optimizer: str = "adam"
    lr: float = 0.03
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    steps: int = 600
    batch_size: int = 32
    grad_clip: float | None = 1.0
    eval_every: int = 200
    max_dev_examples: int = 100  # per pair
    eval_batch_size: int = 128
    max_new_tokens: int = 40
    seed: int = 0
    # Name -> text that starts that language's or task's prompt ("upper" -> "upper "), as a
    # text prefix the model already reads; names not here start from sampled vocabulary rows.
    init_texts: Mapping[str, str] = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.language_length >= 1 and self.task_length >= 1, "prompt lengths must be >= 1"),
            (self.optimizer in ("adam", "adafactor"), f"optimizer {self.optimizer!r}; expected 'adam' or 'adafactor'"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr}; expected a finite value > 0"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r}; expected one of {SCHEDULES}"),
            (0 <= self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps}; expected 0 <= warmup < steps"),
            (self.steps >= 1 and self.batch_size >= 1 and self.eval_every >= 1,
             "steps, batch_size and eval_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


@dataclass
class FactorizedResult:
    languages: dict[str, torch.Tensor]  # name -> [Ll, D] float32
    tasks: dict[str, torch.Tensor]  # name -> [Lt, D] float32
    pair_scores: dict[Pair, float] = field(default_factory=dict)  # dev exact match of each trained pair, last eval
    history: list[dict] = field(default_factory=list)  # {"step", "mean_exact_match", "loss"}
    train_losses: list[float] = field(default_factory=list)

    def compose(self, language: str, task: str) -> torch.Tensor:
        """`[language; task]`, `[Ll + Lt, D]`: what the engine builds for the two segments."""
        return torch.cat([self.languages[language], self.tasks[task]])


def read_pairs_jsonl(path: str | Path) -> dict[Pair, list[Example]]:
    """Examples grouped by (language, task) from JSONL rows with those two fields."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequestError(f"data file {str(path)!r} does not exist; expected JSONL rows with "
                                  '"language", "task", "input" and "target"')
    pairs: dict[Pair, list[Example]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        fields = ("language", "task", "input", "target")
        if not isinstance(row, dict) or not all(isinstance(row.get(name), str) for name in fields):
            raise InvalidRequestError(f"{path}:{number} must have string fields {fields}, got {line[:80]!r}")
        pairs.setdefault((row["language"], row["task"]), []).append(Example(row["input"], row["target"]))
    if not pairs:
        raise InvalidRequestError(f"data file {str(path)!r} holds no examples")
    return pairs


def _initial_rows(embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase, text: str | None, length: int,
                  generator: torch.Generator) -> torch.Tensor:
    if text:
        return text_prompt(embeddings, tokenizer, text, length)  # [L, D]
    top = min(VOCAB_INIT_TOP_TOKENS, embeddings.shape[0])
    return embeddings[torch.randint(top, (length,), generator=generator)].clone()  # [L, D]


def train_factorized(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    train: dict[Pair, Sequence[Example]],
    dev: dict[Pair, Sequence[Example]],
    config: FactorizedConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> FactorizedResult:
    """Train one prompt per language and per task on the frozen `model`, jointly over all pairs."""
    config.validate()
    model.eval()
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    languages = sorted({language for language, _ in train})
    tasks = sorted({task for _, task in train})
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()  # [V, D]
    generator = torch.Generator().manual_seed(config.seed)
    language_table = torch.nn.Parameter(torch.stack(
        [_initial_rows(embeddings, tokenizer, config.init_texts.get(name), config.language_length, generator)
         for name in languages]).to(device))  # [nL, Ll, D]
    task_table = torch.nn.Parameter(torch.stack(
        [_initial_rows(embeddings, tokenizer, config.init_texts.get(name), config.task_length, generator)
         for name in tasks]).to(device))  # [nT, Lt, D]
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor([language_table, task_table], lr=config.lr, relative_step=False,
                              scale_parameter=False, warmup_init=False)
    else:
        optimizer = torch.optim.Adam([language_table, task_table], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.warmup_steps,
                                                                        config.steps))
    rows = [(languages.index(lang), tasks.index(task), example)
            for (lang, task), examples in sorted(train.items()) for example in examples]
    rng = random.Random(config.seed)
    result = FactorizedResult(languages={}, tasks={})
    progress = tqdm(range(1, config.steps + 1), desc=f"factorized {config.tenant}", disable=not config.progress,
                    dynamic_ncols=True)
    for step in progress:
        chosen = rng.sample(rows, min(config.batch_size, len(rows)))
        language_ids = torch.tensor([c[0] for c in chosen], device=device)  # [B]
        task_ids = torch.tensor([c[1] for c in chosen], device=device)  # [B]
        prompts = torch.cat([language_table[language_ids], task_table[task_ids]], dim=1)  # [B, Ll+Lt, D]
        loss = prompt_loss(model, prompts, encode_batch(tokenizer, [c[2] for c in chosen], device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([language_table, task_table], config.grad_clip)
        optimizer.step()
        scheduler.step()
        result.train_losses.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            result.languages = {name: language_table[i].detach().cpu().clone() for i, name in enumerate(languages)}
            result.tasks = {name: task_table[i].detach().cpu().clone() for i, name in enumerate(tasks)}
            if dev:
                result.pair_scores = evaluate_pairs(model, tokenizer, result, dev, config)
                mean = sum(result.pair_scores.values()) / len(result.pair_scores)
                result.history.append({"step": step, "mean_exact_match": mean, "loss": result.train_losses[-1]})
                progress.set_postfix(loss=f"{loss.item():.3f}", dev_em=f"{mean:.3f}")
                if log:
                    log(f"factorized step {step}: mean dev exact match {mean:.3f} over {len(result.pair_scores)} pairs")
        elif step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return result


def evaluate_pairs(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    result: FactorizedResult,
    pairs: dict[Pair, Sequence[Example]],
    config: FactorizedConfig,
) -> dict[Pair, float]:
    """Greedy exact match of each pair whose language and task prompts both exist."""
    scores = {}
    for (language, task), examples in sorted(pairs.items()):
        if language not in result.languages or task not in result.tasks:
            continue
        prompt = result.compose(language, task).to(model.get_input_embeddings().weight.device)
        exact, _, _ = evaluate(model, tokenizer, prompt, list(examples)[: config.max_dev_examples],
                               batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
        scores[(language, task)] = exact
    return scores
