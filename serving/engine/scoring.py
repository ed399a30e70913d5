"""Scoring candidates: rank classification, as prompt-tuned T5 classifiers are evaluated.

A scored request (`GenerationRequest.choices`) asks for the log-likelihood of each candidate
output given its input: log p(candidate tokens, EOS included | [prompt; input]), the sum of
the teacher-forced decoder's log-probabilities of each candidate token. Its row costs one
encoder pass (shared with the rest of its batch, engine/encode.py) plus one decoder pass over
its candidates: every candidate of every scored row of a batch runs in ONE decoder forward,
its row's encoder output repeated for it. Nothing is generated.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from .context import ModelContext
from .sampling import SAMPLING_DTYPE


def score_candidates(
    context: ModelContext,
    hidden: torch.Tensor,  # [B, S, D] encoder output of the scored rows
    mask: torch.Tensor,  # [B, S] their encoder attention mask
    candidates: Sequence[Sequence[Sequence[int]]],  # per row, each candidate's token ids (EOS included)
) -> list[list[float]]:
    """Each row's candidates' log-likelihoods, in order (one host sync)."""
    device = hidden.device
    owners = [row for row, choices in enumerate(candidates) for _ in choices]  # candidate -> its row
    flat = [list(ids) for choices in candidates for ids in choices]
    length = max(len(ids) for ids in flat)
    pad = context.pad_token_id
    labels = torch.tensor([ids + [pad] * (length - len(ids)) for ids in flat], dtype=torch.long).to(device)  # [C, L]
    valid = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in flat], dtype=torch.bool).to(device)
    select = torch.tensor(owners, dtype=torch.long, device=device)  # [C]
    start = torch.full((len(flat), 1), context.decoder_start_token_id, dtype=torch.long, device=device)
    decoder_input = torch.cat([start, labels[:, :-1]], dim=1)  # [C, L] teacher forcing: shifted right
    logits = context.model(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, select)),
        attention_mask=mask.index_select(0, select.to(mask.device)),
        decoder_input_ids=decoder_input,
    ).logits  # [C, L, V]
    logits = logits.to(SAMPLING_DTYPE)
    picked = logits.gather(-1, labels[..., None])[..., 0] - logits.logsumexp(dim=-1)  # [C, L]
    totals = picked.masked_fill(~valid, 0.0).sum(dim=-1).tolist()  # [C]
    scores: list[list[float]] = [[] for _ in candidates]
    for row, total in zip(owners, totals):
        scores[row].append(total)
    return scores
