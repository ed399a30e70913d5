"""SPoT transfer inits from retrieved source prompts (Vu et al., ACL 2022).

- `retrieved`: the similarity-weighted average of the top-K sources' prompts. Weights are the
  positive similarities, normalised to sum to 1 (uniform if no similarity is positive).
- `best-of-k`: a few steps from each of the top K sources, evaluated on dev; training then
  starts from the source whose short run scored best (exact match, then loss).

Sources are ranked by `retrieval.rank_tasks` over the candidates the caller may see; every
source and its score goes into the run's metadata.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from promptmux.prompts.errors import InvalidRequestError

from .retrieval import Match
from .store import PromptStore
from .synthetic_tasks import Example
from .tuning import TrainConfig, tune_prompt


@dataclass
class TransferInit:
    prompt: torch.Tensor  # [L, D] float32
    init_source: str  # e.g. "retrieved:top3" or "best-of-k:demo/reverse@v2"
    metadata: dict = field(default_factory=dict)  # stored as extra["transfer"]


def source_prompts(store: PromptStore, matches: Sequence[Match], length: int | None) -> list[tuple[Match, torch.Tensor]]:
    """The matches' prompts, keeping those of one length (`length`, or the best match's)."""
    loaded = [(match, store.get(match.meta.tenant, match.meta.task, match.meta.version).tensor.float())
              for match in matches]
    if not loaded:
        raise InvalidRequestError(
            "no stored task has a comparable task embedding to transfer from; compute some with "
            "`promptmux prompts embed`, or train with --init vocab"
        )
    length = length or loaded[0][1].shape[0]
    kept = [(match, prompt) for match, prompt in loaded if prompt.shape[0] == length]
    if not kept:
        raise InvalidRequestError(
            f"no retrieved source prompt has {length} rows (they have "
            f"{sorted({p.shape[0] for _, p in loaded})}); leave --length unset to use the sources' length"
        )
    return kept


def _describe(match: Match, weight: float | None = None) -> dict:
    entry = {"name": match.call_name, "tenant": match.meta.tenant, "task": match.meta.task,
             "version": match.meta.version, "similarity": round(match.score, 6)}
    if weight is not None:
        entry["weight"] = round(weight, 6)
    return entry


def weighted_average(sources: Sequence[tuple[Match, torch.Tensor]]) -> TransferInit:
    scores = torch.tensor([max(match.score, 0.0) for match, _ in sources])  # [K]
    weights = scores / scores.sum() if float(scores.sum()) > 0 else torch.full_like(scores, 1 / len(sources))
    prompts = torch.stack([prompt for _, prompt in sources])  # [K, L, D]
    prompt = (weights[:, None, None] * prompts).sum(0)  # [L, D]
    return TransferInit(
        prompt=prompt,
        init_source=f"retrieved:top{len(sources)}",
        metadata={"method": "retrieved", "sources": [_describe(m, float(w)) for (m, _), w in zip(sources, weights)]},
    )


def best_of_k(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Example],
    dev: Sequence[Example],
    sources: Sequence[tuple[Match, torch.Tensor]],
    config: TrainConfig,
    probe_steps: int,
) -> TransferInit:
    """Probe each source with `probe_steps` steps, keep the best on dev."""
    if not dev:
        raise InvalidRequestError("--init best-of-k compares the sources on dev data; give --dev")
    probe_config = dataclasses.replace(config, steps=probe_steps, eval_every=probe_steps, output_dir=None,
                                       warmup_steps=min(config.warmup_steps, probe_steps - 1))
    probes = []
    for match, prompt in sources:
        result = tune_prompt(model, tokenizer, train, dev,
                             dataclasses.replace(probe_config, task=f"{config.task}<-{match.meta.task}"), init=prompt)
        probes.append((match, prompt, result.best))
    winner = max(probes, key=lambda p: (p[2].exact_match, -p[2].loss))
    entries = [{**_describe(m), "probe_exact_match": best.exact_match, "probe_loss": round(best.loss, 6)}
               for m, _, best in probes]
    meta = winner[0].meta
    return TransferInit(
        prompt=winner[1].clone(),
        init_source=f"best-of-k:{meta.tenant}/{meta.task}@v{meta.version}",
        metadata={"method": "best-of-k", "probe_steps": probe_steps, "sources": entries,
                  "chosen": _describe(winner[0])},
    )
