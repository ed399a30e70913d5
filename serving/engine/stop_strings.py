"""Stop sequences, matched on tokens as Hugging Face `generate(stop_strings=...)` matches them.

A row ends at the token that completes one of its stop strings, in any tokenization ("st" +
"op", or a token that runs past the string's end). The matching is Hugging Face's own
`StopStringCriteria`: its per-string tables of which token can end, or continue, a string are
built once per distinct string and kept here, and a step checks every row at once against each
distinct string in use (one vectorised pass per string, never per row). Rows of one batch stop
at different strings: `hits` takes a membership mask.

Rows sit at different lengths in the step loop, so each row's history is right-aligned first
(`aligned_tails`); positions before a row's first token hold an id past the vocabulary, which
the matcher's table maps to "matches nothing".

The text a result returns is cut before the first stop string it contains (`cut_at_stop`),
as OpenAI's `stop` returns it; its tokens keep the whole match.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase, StopStringCriteria

_NO_TOKEN = 1 << 40  # an id past any vocabulary: the matcher clamps it to its dummy row


class StopMatcher:
    """One per model: the matching tables of every stop string seen, built on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._criteria: dict[str, StopStringCriteria] = {}

    def criteria(self, stop: str) -> StopStringCriteria:
        found = self._criteria.get(stop)
        if found is None:
            found = self._criteria[stop] = StopStringCriteria(self.tokenizer, [stop])
        return found

    def span(self, strings: Sequence[str]) -> int:
        """Tokens a match can span: the longest string, one token per character at most."""
        return max(self.criteria(s).maximum_token_len for s in strings)

    def hits(
        self,
        tails: torch.Tensor,  # [B, M] right-aligned histories (aligned_tails)
        columns: Mapping[str, int],  # each distinct stop string in use -> its column of `member`
        member: torch.Tensor,  # [B, S] bool: row b stops at the string of column s
    ) -> torch.Tensor:
        """[B] bool: rows whose last token completed one of their own stop strings."""
        hit = torch.zeros(tails.shape[0], dtype=torch.bool, device=tails.device)
        for stop, column in columns.items():
            hit |= self.criteria(stop)(tails, None) & member[:, column]
        return hit


def aligned_tails(
    history: torch.Tensor,  # [B, C] int64, row b valid in columns [0, lengths[b])
    lengths: torch.Tensor,  # [B] int64
    span: int,
) -> torch.Tensor:
    """The last `span` tokens of each row, right-aligned: [B, span]."""
    offsets = torch.arange(span, device=history.device) - span  # [M]: -M .. -1
    index = lengths[:, None] + offsets[None, :]  # [B, M]
    tails = history.gather(1, index.clamp(min=0))
    return torch.where(index >= 0, tails, _NO_TOKEN)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` before the first stop string it contains (all of it when none)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text
