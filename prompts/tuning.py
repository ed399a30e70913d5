"""Prompt tuning (Lester et al. 2021): learn one `[L, d_model]` soft prompt on a frozen T5.

Only the prompt has a gradient. Each example's encoder input is `[prompt; input; pad]`:
the prompt rows first, the input's token embeddings right after them, right padding last,
with an attention mask over the padding. This is exactly the layout the serving engine
builds, so a prompt serves as it was trained. The loss is the seq2seq cross-entropy of the
target.

Initialisations:
- `random-uniform`: U(-0.5, 0.5), as in the paper;
- `vocab`: rows of sampled token embeddings, from the 5,000 first (most frequent) ids;
- `text`: the token embeddings of a text, right-aligned so the text sits just before the
  input; leading rows left over repeat the embedding of a space;
- `prompt`: an existing prompt from the store (SPoT transfer), copied exactly;
- `retrieved` / `best-of-k`: transfer from the stored tasks whose task embeddings are most
  similar (prompts/transfer.py); the caller resolves them and passes `init=`.

The best prompt (dev exact match, then dev loss) and an early checkpoint (SPoT's task
embedding) are kept; `register_prompt` stores the best with its training metadata.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from promptmux.prompts.errors import InvalidRequestError

from .records import PromptMeta
from .store import PromptStore
from .synthetic_tasks import Example
from .training_plot import plot_training_curve

Init = Literal["random-uniform", "vocab", "text", "prompt", "retrieved", "best-of-k"]
Optimizer = Literal["adafactor", "adam", "sgd"]
Schedule = Literal["constant", "cosine"]
INITS: tuple[str, ...] = ("random-uniform", "vocab", "text", "prompt", "retrieved", "best-of-k")
RETRIEVAL_INITS = ("retrieved", "best-of-k")
OPTIMIZERS: tuple[str, ...] = ("adafactor", "adam", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
DEFAULT_PROMPT_LENGTH = 12
DEFAULT_LR = {"adafactor": 0.3, "adam": 0.1, "sgd": 10.0}  # Lester et al.'s Adafactor rate; Adam needs less
RANDOM_UNIFORM_SCALE = 0.5  # Lester et al.: U(-0.5, 0.5)
VOCAB_INIT_TOP_TOKENS = 5000  # Lester et al.: sample from the 5,000 most common tokens
_IGNORE = -100  # label id the loss skips


@dataclass(frozen=True)
class TrainConfig:
    """Everything one prompt-tuning run needs, built once (CLI or code) and passed down."""

    tenant: str
    task: str
    # None: DEFAULT_PROMPT_LENGTH, or the source prompt's length for init "prompt".
    prompt_length: int | None = None
    init: Init = "vocab"
    init_text: str | None = None
    init_from_task: str | None = None
    init_from_tenant: str | None = None  # None: the tenant being trained for
    top_k: int = 3  # sources for init "retrieved" / "best-of-k"
    probe_steps: int = 10  # steps per source for init "best-of-k"
    optimizer: Optimizer = "adafactor"
    lr: float = DEFAULT_LR["adafactor"]
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 32
    grad_clip: float | None = 1.0
    eval_every: int = 100
    max_dev_examples: int | None = 500
    eval_batch_size: int = 128
    max_new_tokens: int = 64
    # SPoT's task embedding is the prompt after a short, fixed amount of training.
    early_checkpoint_step: int = 100
    seed: int = 0
    output_dir: Path | None = None
    shared: bool = False
    description: str = ""
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.init in INITS, f"init {self.init!r} is unknown; expected one of {INITS}"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is unknown; expected one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} is unknown; expected one of {SCHEDULES}"),
            (self.init != "text" or bool(self.init_text), "init 'text' needs init_text (--init-text 'reverse: ')"),
            (
                self.init != "prompt" or bool(self.init_from_task),
                "init 'prompt' needs the task whose stored prompt to start from (--init-from TASK)",
            ),
            (self.top_k >= 1 and self.probe_steps >= 1, f"top_k={self.top_k}, probe_steps={self.probe_steps}; expected >= 1"),
            (self.prompt_length is None or self.prompt_length >= 1, f"prompt_length={self.prompt_length}; expected >= 1"),
            (self.steps >= 1, f"steps={self.steps}; expected >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}; expected >= 1"),
            (self.eval_every >= 1, f"eval_every={self.eval_every}; expected >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr}; expected a finite value > 0"),
            (0 <= self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps}; expected 0 <= warmup < steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


@dataclass(frozen=True)
class EvalPoint:
    step: int
    exact_match: float  # fraction of dev examples generated exactly, 0..1
    loss: float  # mean per-token dev cross-entropy


@dataclass
class TuningResult:
    prompt: torch.Tensor  # [L, D] float32, the best checkpoint
    early_prompt: torch.Tensor  # [L, D] float32, after early_checkpoint_step steps
    best: EvalPoint | None  # None without a dev set: the prompt is then the last step's
    history: list[EvalPoint] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    init_source: str = ""  # how the prompt began, e.g. "text:'reverse: '" or "prompt:demo/reverse@v1"

    def metadata(self, config: TrainConfig, *, model_name: str, train_examples: int, dev_examples: int) -> dict:
        """Training metadata as stored with the prompt (`extra=`)."""
        settings = {
            key: value
            for key, value in dataclasses.asdict(config).items()
            if key not in ("tenant", "task", "output_dir", "shared", "description", "progress")
        }
        return {
            "method": "prompt-tuning",
            "model": model_name,
            "init_source": self.init_source,
            "settings": settings,
            "train_examples": train_examples,
            "dev_examples": dev_examples,
            "best_step": self.best.step if self.best else config.steps,
            "dev_exact_match": self.best.exact_match if self.best else None,
            "dev_loss": self.best.loss if self.best else None,
            "history": [dataclasses.asdict(point) for point in self.history],
        }


# ---------------------------------------------------------------- data
def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of `{"input": ..., "target": ...}` objects."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequestError(f"data file {str(path)!r} does not exist; expected JSONL of input/target pairs")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{path}:{number} is not valid JSON ({error.msg}); expected one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("input"), str) or not isinstance(record.get("target"), str):
            raise InvalidRequestError(
                f'{path}:{number} must be an object with string fields "input" and "target", got {line[:80]!r}'
            )
        examples.append(Example(record["input"], record["target"]))
    if not examples:
        raise InvalidRequestError(f"data file {str(path)!r} holds no examples")
    return examples


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, S] right-padded
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, T] right-padded with _IGNORE
    targets: list[str]


def encode_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], device: torch.device) -> EncodedBatch:
    """Token ids with right padding, built here so no tokenizer padding setting can flip it."""
    sources = tokenizer([e.input for e in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=True)["input_ids"]
    input_ids, attention_mask = _right_pad(sources, tokenizer.pad_token_id, device)
    labels, _ = _right_pad(targets, _IGNORE, device)
    return EncodedBatch(input_ids, attention_mask, labels, [e.target for e in examples])


def _right_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # host-side list building, before any tensor reaches the device
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------- model plumbing
def prompted_inputs(
    model: T5ForConditionalGeneration, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[prompt; input; pad]` embeddings and their mask. A None prompt runs the model as is.

    `prompt` is one `[L, D]` prompt for every row, or `[B, L, D]`: one per row (factorized
    prompts train rows of different language/task pairs in one batch)."""
    embeds = model.get_input_embeddings()(input_ids)  # [B, S, D]
    if prompt is None:
        return embeds, attention_mask
    batch = input_ids.shape[0]
    rows = prompt.to(embeds.dtype)
    rows = rows if rows.dim() == 3 else rows.unsqueeze(0).expand(batch, -1, -1)  # [B, L, D]
    prompt_mask = attention_mask.new_ones(batch, rows.shape[1])  # [B, L]
    return torch.cat([rows, embeds], dim=1), torch.cat([prompt_mask, attention_mask], dim=1)


def prompt_loss(model: T5ForConditionalGeneration, prompt: torch.Tensor | None, batch: EncodedBatch) -> torch.Tensor:
    inputs_embeds, mask = prompted_inputs(model, prompt, batch.input_ids, batch.attention_mask)
    return model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=batch.labels).loss


@torch.no_grad()
def evaluate(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    prompt: torch.Tensor | None,
    examples: Sequence[Example],
    *,
    batch_size: int = 128,
    max_new_tokens: int = 64,
) -> tuple[float, float, list[str]]:
    """Greedy exact match (0..1), mean per-token loss, and the predictions."""
    device = model.get_input_embeddings().weight.device
    hits, loss_sum, tokens, predictions = 0, 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = encode_batch(tokenizer, examples[start : start + batch_size], device)
        label_tokens = int((batch.labels != _IGNORE).sum())
        loss_sum += float(prompt_loss(model, prompt, batch)) * label_tokens
        tokens += label_tokens
        inputs_embeds, mask = prompted_inputs(model, prompt, batch.input_ids, batch.attention_mask)
        # One token past the longest target is enough to prove a longer answer wrong.
        budget = min(max_new_tokens, batch.labels.shape[1] + 1)
        generated = model.generate(
            inputs_embeds=inputs_embeds, attention_mask=mask, max_new_tokens=budget, do_sample=False, num_beams=1
        )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        hits += sum(text == target for text, target in zip(texts, batch.targets))
        predictions.extend(texts)
    return hits / max(len(examples), 1), loss_sum / max(tokens, 1), predictions


# ---------------------------------------------------------------- initialisation
def initial_prompt(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    store: PromptStore | None = None,
) -> tuple[torch.Tensor, str]:
    """The starting prompt `[L, D]` (float32, CPU) and a short description of its source."""
    config.validate()
    if config.init in RETRIEVAL_INITS:
        raise InvalidRequestError(
            f"init {config.init!r} transfers from retrieved sources: resolve them with prompts/transfer.py "
            "and pass the prompt as init= (the `prompts train` command does this)"
        )
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()  # [V, D]
    generator = torch.Generator().manual_seed(config.seed)
    length = config.prompt_length or DEFAULT_PROMPT_LENGTH
    if config.init == "random-uniform":
        prompt = (torch.rand(length, embeddings.shape[1], generator=generator) * 2 - 1) * RANDOM_UNIFORM_SCALE
        return prompt, f"random-uniform:{RANDOM_UNIFORM_SCALE}"
    if config.init == "vocab":
        top = min(VOCAB_INIT_TOP_TOKENS, embeddings.shape[0])
        if length <= top:
            ids = torch.randperm(top, generator=generator)[:length]
        else:
            ids = torch.randint(top, (length,), generator=generator)
        return embeddings[ids].clone(), f"vocab:top{top}"
    if config.init == "text":
        return text_prompt(embeddings, tokenizer, config.init_text or "", config.prompt_length), f"text:{config.init_text!r}"
    return _stored_prompt(config, store, embeddings.shape[1])


def text_prompt(
    embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase, text: str, length: int | None
) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidRequestError(f"init text {text!r} has no tokens; give a non-empty text such as 'reverse: '")
    length = length or max(len(ids), DEFAULT_PROMPT_LENGTH)
    if len(ids) > length:
        raise InvalidRequestError(
            f"init text {text!r} has {len(ids)} tokens but the prompt length is {length}; "
            "shorten the text or raise the prompt length (--length)"
        )
    # Leading spaces leave the text's meaning intact, so the filler rows repeat a space.
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][:1] or ids[:1]
    ids = space * (length - len(ids)) + ids
    return embeddings[torch.tensor(ids)].clone()  # [L, D]


def _stored_prompt(config: TrainConfig, store: PromptStore | None, d_model: int) -> tuple[torch.Tensor, str]:
    if store is None:
        raise InvalidRequestError("init 'prompt' needs a prompt store to read the source prompt from")
    tenant = config.init_from_tenant or config.tenant
    meta = store.resolve(tenant, config.init_from_task)
    stored = store.get(meta.tenant, meta.task, meta.version)
    if stored.tensor.shape[1] != d_model:
        raise InvalidRequestError(
            f"source prompt {meta.tenant}/{meta.task} has d_model {stored.tensor.shape[1]}, the model has {d_model}; "
            "SPoT transfer needs a prompt trained for the same model size"
        )
    if config.prompt_length is not None and config.prompt_length != stored.tensor.shape[0]:
        raise InvalidRequestError(
            f"source prompt {meta.tenant}/{meta.task} has {stored.tensor.shape[0]} rows but prompt_length is "
            f"{config.prompt_length}; leave the length unset to use the source's"
        )
    return stored.tensor.float().clone(), f"prompt:{meta.tenant}/{meta.task}@v{meta.version}"


# ---------------------------------------------------------------- training
def tune_prompt(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Example],
    dev: Sequence[Example],
    config: TrainConfig,
    *,
    store: PromptStore | None = None,
    init: torch.Tensor | None = None,
    init_source: str = "given",
    log: Callable[[str], None] | None = None,
) -> TuningResult:
    """Train a soft prompt on the frozen `model`. `init` overrides `config.init` when given."""
    config.validate()
    if not train:
        raise InvalidRequestError("no training examples; give a JSONL file of input/target pairs")
    model.eval()
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    if init is None:
        init, init_source = initial_prompt(model, tokenizer, config, store)
    prompt = torch.nn.Parameter(init.detach().float().clone().to(device))  # [L, D]
    optimizer = _optimizer(config, prompt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, config.warmup_steps, config.steps))
    dev = list(dev)[: config.max_dev_examples] if config.max_dev_examples else list(dev)
    batches = _batches(train, config.batch_size, config.seed)

    result = TuningResult(prompt=prompt.detach().cpu().clone(), early_prompt=prompt.detach().cpu().clone(),
                          best=None, init_source=init_source)
    progress = tqdm(range(1, config.steps + 1), desc=f"prompt {config.tenant}/{config.task}",
                    disable=not config.progress, dynamic_ncols=True)
    for step in progress:
        batch = encode_batch(tokenizer, next(batches), device)
        loss = prompt_loss(model, prompt, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([prompt], config.grad_clip)
        optimizer.step()
        scheduler.step()
        result.train_losses.append(loss.item())
        if step == min(config.early_checkpoint_step, config.steps):
            result.early_prompt = prompt.detach().cpu().clone()
        if dev and (step % config.eval_every == 0 or step == config.steps):
            point = _evaluate_point(model, tokenizer, prompt, dev, step, config)
            result.history.append(point)
            if result.best is None or (point.exact_match, -point.loss) > (result.best.exact_match, -result.best.loss):
                result.best = point
                result.prompt = prompt.detach().cpu().clone()
            progress.set_postfix(loss=f"{result.train_losses[-1]:.3f}", dev_em=f"{point.exact_match:.3f}")
            if log:
                log(f"{config.tenant}/{config.task} step {step}: dev exact match {point.exact_match:.3f}, loss {point.loss:.4f}")
        elif step % 10 == 0:
            progress.set_postfix(loss=f"{result.train_losses[-1]:.3f}")
    if not dev:
        result.prompt = prompt.detach().cpu().clone()
    if config.output_dir is not None:
        save_checkpoints(result, config)
    return result


def _evaluate_point(model, tokenizer, prompt, dev, step, config) -> EvalPoint:
    exact, loss, _ = evaluate(model, tokenizer, prompt.detach(), dev,
                              batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
    return EvalPoint(step=step, exact_match=exact, loss=loss)


def _optimizer(config: TrainConfig, prompt: torch.nn.Parameter) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor([prompt], lr=config.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if config.optimizer == "sgd":
        # Plain SGD keeps the displacement proportional to the summed gradients: the task
        # embeddings' recipe (prompts/task_embedding.py) relies on that.
        return torch.optim.SGD([prompt], lr=config.lr)
    return torch.optim.Adam([prompt], lr=config.lr)


def lr_factor(schedule: Schedule, warmup_steps: int, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warmup, then constant or cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterable[list[Example]]:
    """Endless shuffled epochs; the last short batch of an epoch is folded into the next."""
    rng = random.Random(seed)
    order: list[Example] = []
    while True:
        if len(order) < batch_size:
            epoch = list(examples)
            rng.shuffle(epoch)
            order.extend(epoch)
            continue
        yield order[:batch_size]
        del order[:batch_size]


# ---------------------------------------------------------------- outputs
def save_checkpoints(result: TuningResult, config: TrainConfig) -> dict[str, Path]:
    """`best.safetensors`, `early.safetensors` (the task embedding), `history.json` and, with
    matplotlib installed, `curve.png`."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"best": out / "best.safetensors", "early": out / "early.safetensors", "history": out / "history.json"}
    save_file({"prompt": result.prompt.contiguous()}, str(paths["best"]),
              metadata={"task": config.task, "kind": "best"})
    save_file({"prompt": result.early_prompt.contiguous()}, str(paths["early"]),
              metadata={"task": config.task, "kind": "early", "step": str(min(config.early_checkpoint_step, config.steps))})
    paths["history"].write_text(json.dumps({
        "history": [dataclasses.asdict(p) for p in result.history],
        "train_losses": result.train_losses,
    }))
    curve = plot_training_curve(
        result.train_losses, [(p.step, p.exact_match, p.loss) for p in result.history], out / "curve.png",
        title=f"prompt tuning {config.tenant}/{config.task}",
        early_step=min(config.early_checkpoint_step, config.steps), best_step=result.best.step if result.best else None,
    )
    if curve is not None:
        paths["curve"] = curve
    return paths


def register_prompt(
    store: PromptStore,
    result: TuningResult,
    config: TrainConfig,
    *,
    model_name: str,
    train_examples: int,
    dev_examples: int,
    extra: dict | None = None,
    task_embedding: torch.Tensor | None = None,
) -> PromptMeta:
    """Store the best prompt as a new version of (tenant, task), with its training metadata,
    any `extra` (e.g. the transfer sources) and, if given, its task embedding."""
    metadata = result.metadata(config, model_name=model_name, train_examples=train_examples, dev_examples=dev_examples)
    if config.output_dir is not None:
        metadata["early_checkpoint_file"] = str(Path(config.output_dir) / "early.safetensors")
    metadata.update(extra or {})
    description = config.description or f"prompt-tuned on {train_examples} examples"
    return store.register(config.tenant, config.task, result.prompt, shared=config.shared,
                          description=description, extra=metadata, task_embedding=task_embedding)
