"""Per-row sampling: greedy, or temperature + top-k + top-p with each row's own random stream,
and the per-row logits controls applied before it (`control_logits`: repetition penalty,
no-repeat n-grams, EOS masked until min_new_tokens) and the log-probabilities reported after it
(`token_logprobs`), each as Hugging Face `generate`'s processor of the same name computes it.

One function, `sample_rows`, picks the next token of every row of a decode step at once; the
step loop (step/executor.py) and the static path (static_decoding.PerRowSampler, inside Hugging Face
`generate`) both call it, so a request samples the same way on either path.

Each row's randomness is a counter-based generator: the uniform draw for a row's k-th token
is a hash of (the row's seed, k), computed with integer tensor ops on the device. So
- a seeded row's tokens never depend on its batch-mates, their number or their order (no
  shared RNG is consumed, and no row's draw depends on another row's);
- a whole batch draws its numbers in one vectorised pass: no per-row Python loop, no host
  sync, and the same kernels every step (safe under CUDA graphs);
- the same request gives the same tokens on the step loop and on the static path.
Rows without a seed get one drawn from torch's default generator at admission, so
`torch.manual_seed` still makes a whole run reproducible.

Sampling runs in float32 whatever the model's dtype. Parameters are checked in that dtype
once, when the request is prepared (`GenerationParams.validate`): a temperature of 1e-300 is a
valid Python float but 0 in float32.
"""
from __future__ import annotations

import torch

from .types import GenerationParams, TokenLogprob

SAMPLING_DTYPE = torch.float32
_MASK32 = 0xFFFFFFFF
_SEED_SPACE = 2**62  # seeds drawn for unseeded rows


def row_seed(params: GenerationParams) -> int:
    """The row's seed: its own, or one drawn from torch's default generator (host side)."""
    if params.seed is not None:
        return int(params.seed)
    return int(torch.randint(_SEED_SPACE, (1,)).item())


def seed_words(seed: int) -> tuple[int, int]:
    """A seed of any size as two 32-bit words (what the device hash consumes)."""
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(x * factor) mod 2**32 for x in [0, 2**32), in int64 without overflow."""
    low = (x & 0xFFFF) * factor  # < 2**48
    high = ((x >> 16) * factor) & 0xFFFF  # only its low 16 bits survive the shift below
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (the 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform draw in [0, 1 - 2**-24] per row: a hash of (seed, counter).

    seeds: [B, 2] int64, two 32-bit words per row (`seed_words`); counters: [B] int64, the
    index of the token being drawn. Returns [B] float32."""
    x = _mix32((seeds[:, 0] + 0x9E3779B9) & _MASK32)
    x = _mix32(x ^ seeds[:, 1])
    x = _mix32(x ^ (counters & _MASK32))  # [B]
    return (x >> 8).to(SAMPLING_DTYPE) * (1.0 / (1 << 24))


def sample_rows(
    logits: torch.Tensor,  # [B, V] any float dtype
    greedy: torch.Tensor,  # [B] bool: argmax rows
    temperature: torch.Tensor,  # [B] float32, > 0 (any positive value on greedy rows)
    top_p: torch.Tensor,  # [B] float32 in (0, 1]
    seeds: torch.Tensor,  # [B, 2] int64 (seed_words)
    counters: torch.Tensor,  # [B] int64: how many tokens each row has produced
    *,
    filter_top_p: bool = True,
    top_k: torch.Tensor | None = None,  # [B] int64, 0: off
    top_k_max: int = 0,  # the largest top_k of the rows (host side: no sync)
) -> torch.Tensor:
    """The next token of every row: argmax on greedy rows; elsewhere a draw from the row's
    softmax(logits / temperature), restricted to its top-k tokens (Hugging Face's
    TopKLogitsWarper: ties with the k-th kept), then to its top-p nucleus, with its own uniform.

    `filter_top_p=False` skips the nucleus sort when the caller knows every sampling row has
    top_p == 1 (the result is the same: such a row keeps every token). Returns [B] int64."""
    logits = logits.to(SAMPLING_DTYPE)
    best = logits.argmax(dim=-1)  # [B]
    # Subtract the maximum first: the top token scores exactly 0 for any temperature, so a
    # tiny temperature gives -inf elsewhere (a one-hot softmax) instead of inf - inf = NaN.
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # [B, V] <= 0
    scaled = shifted / temperature[:, None]  # [B, V]
    if top_k is not None and top_k_max > 0:
        kept = min(top_k_max, scaled.shape[-1])
        values = scaled.topk(kept, dim=-1).values  # [B, k] descending
        kth = values.gather(1, (top_k.clamp(1, kept) - 1)[:, None])  # [B, 1]
        kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))  # rows without top_k keep every token
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)  # [B, V]
    if filter_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]  # [B, V]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, V] in vocabulary order, unnormalised after the nucleus cut
    # u <= 1 - 2**-24, so u * total < total: the first index whose cdf passes the threshold
    # always exists and has a non-zero probability.
    threshold = row_uniforms(seeds, counters)[:, None] * cdf[:, -1:]  # [B, 1]
    sampled = (cdf <= threshold).sum(dim=-1)  # [B] index of the first cdf entry above it
    return torch.where(greedy, best, sampled)


# ---------------------------------------------------------------------- logits controls
def penalize_repetition(
    scores: torch.Tensor,  # [B, V] float32
    history: torch.Tensor,  # [B, C] int64: the decoder's input so far (start token, then the output)
    lengths: torch.Tensor,  # [B] int64: valid columns of each row's history
    penalty: torch.Tensor,  # [B] float32, 1.0: off
) -> torch.Tensor:
    """Hugging Face's RepetitionPenaltyLogitsProcessor per row: a token already in the row's
    history has its score divided by the penalty (multiplied, when negative)."""
    columns = torch.arange(history.shape[1], device=history.device)  # [C]
    # Columns past a row's length point at its first token (always in its history), so the
    # scatter below marks nothing that is not there.
    index = torch.where(columns[None, :] < lengths[:, None], history, history[:, :1])  # [B, C]
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)  # [B, V]
    factor = penalty[:, None]
    penalized = torch.where(scores < 0, scores * factor, scores / factor)  # [B, V]
    return torch.where(seen & (factor != 1.0), penalized, scores)


def ban_repeated_ngrams(
    scores: torch.Tensor,  # [B, V] float32
    history: torch.Tensor,  # [B, C] int64
    lengths: torch.Tensor,  # [B] int64
    sizes: torch.Tensor,  # [B] int64: each row's no_repeat_ngram_size, 0: off
    distinct_sizes: list[int],  # the non-zero sizes among the rows (host side)
) -> torch.Tensor:
    """Hugging Face's NoRepeatNGramLogitsProcessor per row: a token that would complete an
    n-gram already in the row's history scores -inf. One pass per distinct n, never per row."""
    columns = history.shape[1]
    for n in distinct_sizes:
        if columns < n:
            continue
        windows = history.unfold(1, n, 1)  # [B, W, n], W = C - n + 1: every n-gram start
        starts = torch.arange(windows.shape[1], device=history.device)  # [W]
        # The row's last n-1 tokens, the prefix a new token would complete.
        offsets = torch.arange(n - 1, device=history.device)  # [n-1]
        prefix = history.gather(1, (lengths[:, None] - (n - 1) + offsets[None, :]).clamp(min=0))  # [B, n-1]
        match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)  # [B, W]
        match &= starts[None, :] <= (lengths - n)[:, None]  # n-grams inside the row's history
        match &= (sizes == n)[:, None]
        banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        banned.scatter_add_(1, windows[:, :, n - 1], match.to(torch.int32))  # [B, V] > 0: banned
        scores = scores.masked_fill(banned > 0, float("-inf"))
    return scores


def mask_early_eos(
    scores: torch.Tensor,  # [B, V] float32, modified in place
    produced: torch.Tensor,  # [B] int64: tokens each row has produced
    until: torch.Tensor,  # [B] int64: EOS stays masked while produced < until
    eos_token_id: int,
) -> torch.Tensor:
    """Hugging Face's MinNewTokensLengthLogitsProcessor per row (ignore_eos: until = max_new_tokens),
    on the EOS column alone: O(B), not a pass over the whole [B, V] scores."""
    scores[:, eos_token_id] = scores[:, eos_token_id].masked_fill(produced < until, float("-inf"))
    return scores


def control_logits(
    logits: torch.Tensor,  # [B, V] any float dtype
    history: torch.Tensor,  # [B, C] int64
    lengths: torch.Tensor,  # [B] int64
    penalty: torch.Tensor,  # [B] float32
    ngram_sizes: torch.Tensor,  # [B] int64
    distinct_ngram_sizes: list[int],
    eos_until: torch.Tensor,  # [B] int64
    eos_token_id: int,
    *,
    penalize: bool = True,
    owns_logits: bool = False,
) -> torch.Tensor:
    """Every row's logits controls, in the order `generate` applies them: repetition penalty,
    no-repeat n-grams, then EOS masked before min_new_tokens. Returns float32 [B, V].
    `owns_logits`: the caller needs `logits` no more, so they may be changed in place (else a
    float32 copy is changed)."""
    scores = logits.to(SAMPLING_DTYPE)
    fresh = scores is not logits  # a copy already: ours to change
    if penalize:
        scores, fresh = penalize_repetition(scores, history, lengths, penalty), True
    if distinct_ngram_sizes:
        scores, fresh = ban_repeated_ngrams(scores, history, lengths, ngram_sizes, distinct_ngram_sizes), True
    if not (fresh or owns_logits):
        scores = scores.clone()
    return mask_early_eos(scores, lengths - 1, eos_until, eos_token_id)


def token_logprobs(
    logits: torch.Tensor,  # [B, V] the model's raw logits
    chosen: torch.Tensor,  # [B] int64
    top: int,  # alternatives per row (host side)
) -> torch.Tensor:
    """[B, 1 + 2 * top] float64: the chosen token's log-probability, then the `top` most likely
    token ids and their log-probabilities (most likely first), under the model's own
    distribution (log-softmax in float32 of the raw logits, before any control)."""
    logprobs = logits.to(SAMPLING_DTYPE).log_softmax(dim=-1)  # [B, V]
    columns = [logprobs.gather(1, chosen[:, None])]  # [B, 1]
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[1]), dim=-1)  # [B, k]
        columns += [ids.double(), values.double()]
    return torch.cat([columns[0].double(), *columns[1:]], dim=1)


def unpack_logprobs(token: int, values: list[float], top: int) -> TokenLogprob:
    """One row of token_logprobs, on the host, with the row's own `top` of the k alternatives."""
    k = (len(values) - 1) // 2
    return TokenLogprob(token, values[0], tuple(TokenLogprob(int(values[1 + i]), values[1 + k + i]) for i in range(top)))
