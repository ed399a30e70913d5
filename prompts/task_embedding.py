"""Task embeddings (SPoT, Vu et al. 2022): an early checkpoint of a task's prompt tuning.

Every task embedding starts from the SAME prompt and takes the same short run (`steps` SGD
steps on the task's own data). Two tasks that pull the prompt the same way get embeddings
that point the same way.

The shared init is the text prompt `init_text` ("copy: " by default: a prompt under which the
model already does something sensible), not random token embeddings. Measured on the
embedded model (benchmarks/results/prompt-science/report.md): from a random vocabulary init
the gradients are dominated by the particular input strings of each batch, so two seeds of
one task were less alike than two tasks on the same strings; from a working prompt the task's
targets dominate. Plain SGD (not Adam) keeps the displacement proportional to the summed
gradients, so coordinates that only carry noise do not get a full step each.

Similarity is the cosine of the mean token of each embedding's displacement from the shared
init: `cos(mean_rows(a - init), mean_rows(b - init))` ("mean-token"). The init is subtracted
because after a short run it still dominates every embedding (raw cosines of any two tasks
sit near 1). "flattened" (cosine of the whole `[L, D]` displacement) compares rows position
by position; the study measures both.

An embedding is comparable with another only if both came from the same model and recipe:
`EmbeddingRecipe.comparable_key` names what must match, and it is stored with each one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from promptmux.prompts.errors import InvalidRequestError

from .synthetic_tasks import Example
from .tuning import TrainConfig, initial_prompt, tune_prompt

SIMILARITIES: tuple[str, ...] = ("mean-token", "flattened")
TASK_EMBEDDING_EXTRA_KEY = "task_embedding"  # PromptMeta.extra key describing a stored embedding


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How every task embedding of one model is made; bounds the work of computing one.

    Config section `task_embedding` (serving/config.py); the CLI and the SimilarTasks RPC
    use the same recipe, so a query embedding is comparable with the stored ones."""

    steps: int = 12  # SGD steps of the short run: SPoT's "early checkpoint"
    batch_size: int = 16
    prompt_length: int = 12
    lr: float = 1.0
    init_text: str | None = "copy: "  # the fixed, shared init; None: random token embeddings (init_seed)
    init_seed: int = 0
    data_seed: int = 0  # batch order of the short run
    max_examples: int = 2000  # at most this many examples are read (RPC callers may send no more)
    similarity: str = "mean-token"

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"task_embedding.steps={self.steps}; expected >= 1"),
            (self.batch_size >= 1, f"task_embedding.batch_size={self.batch_size}; expected >= 1"),
            (self.prompt_length >= 1, f"task_embedding.prompt_length={self.prompt_length}; expected >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"task_embedding.lr={self.lr}; expected a finite value > 0"),
            (self.max_examples >= 1, f"task_embedding.max_examples={self.max_examples}; expected >= 1"),
            (self.similarity in SIMILARITIES,
             f"task_embedding.similarity={self.similarity!r}; expected one of {SIMILARITIES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    def comparable_key(self, model_name: str) -> dict:
        """What two embeddings must share to be compared: the model and the run that made them."""
        return {"model": model_name, "steps": self.steps, "batch_size": self.batch_size,
                "prompt_length": self.prompt_length, "lr": self.lr, "init_text": self.init_text,
                "init_seed": self.init_seed}

    def train_config(self, tenant: str, task: str) -> TrainConfig:
        return TrainConfig(
            tenant=tenant, task=task, prompt_length=self.prompt_length, init="text" if self.init_text else "vocab",
            init_text=self.init_text or None, optimizer="sgd", lr=self.lr, schedule="constant", steps=self.steps, batch_size=self.batch_size,
            eval_every=self.steps + 1, early_checkpoint_step=self.steps, seed=self.init_seed, progress=False,
        )


@dataclass(frozen=True)
class TaskEmbedding:
    tensor: torch.Tensor  # [L, D] float32: the prompt after `recipe.steps` steps from the shared init
    info: dict  # stored as PromptMeta.extra["task_embedding"]


def shared_init(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                recipe: EmbeddingRecipe) -> torch.Tensor:
    """The fixed prompt `[L, D]` every task embedding of this model and recipe starts from."""
    prompt, _ = initial_prompt(model, tokenizer, recipe.train_config("-", "-"))
    return prompt


def compute_task_embedding(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    recipe: EmbeddingRecipe,
    *,
    model_name: str,
    init: torch.Tensor | None = None,
) -> TaskEmbedding:
    """Run the recipe's short prompt-tuning run on `examples` (at most `max_examples`)."""
    recipe.validate()
    if not examples:
        raise InvalidRequestError("a task embedding needs examples of the task; got none")
    if len(examples) > recipe.max_examples:
        examples = list(examples)[: recipe.max_examples]
    if init is None:
        init = shared_init(model, tokenizer, recipe)
    config = dataclasses.replace(recipe.train_config("-", "-"), seed=recipe.data_seed)
    result = tune_prompt(model, tokenizer, examples, [], config, init=init)
    info = {**recipe.comparable_key(model_name), "similarity": recipe.similarity, "examples": len(examples)}
    return TaskEmbedding(tensor=result.prompt, info=info)


def similarity(a: torch.Tensor, b: torch.Tensor, init: torch.Tensor, method: str = "mean-token") -> float:
    """Cosine of two embeddings' displacements from the shared init (see the module doc)."""
    if a.shape != b.shape or a.shape != init.shape:
        raise InvalidRequestError(
            f"task embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)} (init {tuple(init.shape)}) "
            "cannot be compared; recompute them with one recipe (promptmux prompts embed)"
        )
    da, db = a.float() - init.float(), b.float() - init.float()  # [L, D]
    if method == "mean-token":
        return float(F.cosine_similarity(da.mean(0), db.mean(0), dim=0))
    if method == "flattened":
        return float(F.cosine_similarity(da.flatten(), db.flatten(), dim=0))
    raise InvalidRequestError(f"similarity {method!r} is unknown; expected one of {SIMILARITIES}")


def similarity_matrix(embeddings: Sequence[torch.Tensor], init: torch.Tensor, method: str = "mean-token") -> torch.Tensor:
    """`[N, N]` pairwise similarities, computed in one matrix product."""
    deltas = torch.stack([e.float() - init.float() for e in embeddings])  # [N, L, D]
    vectors = deltas.mean(1) if method == "mean-token" else deltas.flatten(1)  # [N, D] or [N, L*D]
    vectors = F.normalize(vectors, dim=1)
    return vectors @ vectors.T
