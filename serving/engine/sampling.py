"""Per-row sampling: greedy, or temperature + top-p with each row's own random stream.

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

from .types import GenerationParams

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
) -> torch.Tensor:
    """The next token of every row: argmax on greedy rows; elsewhere a draw from the row's
    softmax(logits / temperature), restricted to its top-p nucleus, with its own uniform.

    `filter_top_p=False` skips the nucleus sort when the caller knows every sampling row has
    top_p == 1 (the result is the same: such a row keeps every token). Returns [B] int64."""
    logits = logits.to(SAMPLING_DTYPE)
    best = logits.argmax(dim=-1)  # [B]
    # Subtract the maximum first: the top token scores exactly 0 for any temperature, so a
    # tiny temperature gives -inf elsewhere (a one-hot softmax) instead of inf - inf = NaN.
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # [B, V] <= 0
    probs = (shifted / temperature[:, None]).softmax(dim=-1)  # [B, V]
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
