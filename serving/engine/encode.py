"""The one encode path: prepared requests in, encoder output of `[prompt; input; pad]` rows out.

Both executors encode through here: the static one once per batch, the step one once per
admission. Each request leases its own prompts from the bank, so a prompt that cannot load
(deleted since it was resolved, unreadable, larger than the bank) fails its request alone and
the others are encoded. The leases are released right after the encoder forward: the bank's
rows are read only by the fused concat, and the decoders read the encoder output, never the
bank. On CUDA the release happens after the encoder's kernels are *queued*; a later bank write
that reuses a page is queued on the same stream, hence runs after them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from promptmux.kernels.prompt_concat import build_encoder_inputs, pack_segments
from promptmux.prompts.errors import PromptmuxError

from .context import ModelContext
from .prompt_bank import Lease
from .types import PreparedRequest

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """The encoder output of the requests that could be encoded."""

    rows: list[int]  # position of each encoded request in the caller's list
    hidden: torch.Tensor  # [B, S, D] last hidden state, padding past each row's length
    attention_mask: torch.Tensor  # [B, S] 1 on [prompt; input] positions
    lengths: list[int]  # [prompt; input] length of each row (host side: no device sync)
    padding_fraction: float  # share of the B x S encoder positions that are padding
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0


def encode(context: ModelContext, prepared: Sequence[PreparedRequest]) -> tuple[Encoded | None, dict[int, PromptmuxError]]:
    """(the encoder output of every request whose prompts leased, {position: error} of the
    others). The encoder output is None when no request could be encoded."""
    bank = context.bank
    errors: dict[int, PromptmuxError] = {}
    rows: list[int] = []
    leases: list[Lease] = []
    try:
        for i, request in enumerate(prepared):
            try:
                leases.append(bank.lease(request.prompts))
                rows.append(i)
            except Exception as error:
                errors[i] = own_failure(error, "loading the prompt of")
        if not rows:
            return None, errors
        # Host-side metadata: every length is known here, so sizing S needs no device sync.
        segment_rows = [
            [seg for m in prepared[i].prompts for seg in lease.segments[(m.tenant, m.task, m.version)]]
            for i, lease in zip(rows, leases)
        ]
        segments = pack_segments(segment_rows, context.device)
        input_lengths = [len(prepared[i].token_ids) for i in rows]
        lengths = [pl + il for pl, il in zip(segments.prompt_lengths, input_lengths)]
        width = max(input_lengths)
        pad = context.pad_token_id
        padded = [list(prepared[i].token_ids) + [pad] * (width - len(prepared[i].token_ids)) for i in rows]
        input_ids = torch.tensor(padded, dtype=torch.long).to(context.device, non_blocking=True)  # [B, T]
        input_lens = torch.tensor(input_lengths, dtype=torch.long).to(context.device, non_blocking=True)  # [B]
        inputs = build_encoder_inputs(
            input_ids, input_lens, context.embedding, bank.rows, segments, max(lengths),
            backend=context.config.concat_backend,
        )
        hidden = context.model.get_encoder()(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask
        ).last_hidden_state  # [B, S, D]
    finally:
        for lease in leases:  # the encoder pass was the prompts' last reader
            bank.release(lease)
    return Encoded(
        rows=rows, hidden=hidden, attention_mask=inputs.attention_mask, lengths=lengths,
        padding_fraction=1.0 - sum(lengths) / (len(lengths) * max(lengths)),
        cache_hits=sum(lease.hits for lease in leases), cache_misses=sum(lease.misses for lease in leases),
        cache_evictions=sum(lease.evictions for lease in leases),
    ), errors


def own_failure(error: Exception, doing: str) -> PromptmuxError:
    """The error a single request gets for a failure that is its own: its PromptmuxError, or
    an INTERNAL one whose traceback goes to the log."""
    if isinstance(error, PromptmuxError):
        return error
    log.exception("%s one request failed; the rest of its batch runs", doing, exc_info=error)
    return PromptmuxError(
        f"internal error {doing} this request ({type(error).__name__}); it failed alone, the replica log "
        "has the traceback"
    )
