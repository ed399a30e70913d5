"""Fused prompt-concat + attention mask: the encoder input of one mixed-task batch.

Every request b contributes, in order along the sequence axis:

    [ its prompt segments (P_b bank rows) | its tokens' embeddings (L_b rows) | zeros ]

and the attention mask is 1 on exactly the first P_b + L_b positions. Right padding after
`[prompt; input]` keeps T5's relative position bias identical to an unbatched run (the bias
depends only on key position minus query position; README.md, "How a mixed batch runs");
padding between prompt and input would not.

The file tells the whole story, Triton-tutorial style:
  1. `build_encoder_inputs_reference`: the clarity-first definition (loops over requests).
  2. `_prompt_concat_kernel_body`: the Triton kernel, one launch for the whole batch.
  3. `build_encoder_inputs_triton`: its launcher.
  4. `build_encoder_inputs_torch`: the vectorised PyTorch path (CPU default).
  5. `build_encoder_inputs`: the dispatcher the engine calls.

All paths copy rows bit for bit: no arithmetic touches the values.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch and reference paths still work.
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class EncoderInputs:
    embeds: torch.Tensor  # [B, S, D] same dtype as the token-embedding table
    attention_mask: torch.Tensor  # [B, S] long: 1 on prompt + token positions, 0 on padding
    prompt_lengths: torch.Tensor  # [B] long
    total_lengths: torch.Tensor  # [B] long: prompt + input


@dataclass
class SegmentTable:
    """Which bank rows form each request's prompt, in CSR layout (built on host once per batch).

    A prompt may be a composition (a language prompt, then a task prompt), so a row holds
    any number of segments, each a contiguous run of bank rows.
    """

    offsets: torch.Tensor  # [N] long: first bank row of each segment
    lengths: torch.Tensor  # [N] long: rows in each segment (may be 0)
    row_starts: torch.Tensor  # [B+1] long: segments of row b are [row_starts[b], row_starts[b+1])
    prompt_lengths: list[int]  # [B] host ints: sum of the row's segment lengths
    # Host int: max(offset + length) over segments, so the bank's size is checked without a
    # device sync. 0 means unknown (a table built by hand) and skips that check.
    bank_rows_needed: int = 0


def pack_segments(rows: Sequence[Sequence[tuple[int, int]]], device: torch.device | str) -> SegmentTable:
    """Pack per-request segment lists into a SegmentTable on `device`.

    rows[b] = [(bank_offset, length), ...] in prompt order. Host-side Python over metadata
    only; the three index tensors travel to the device in one copy.
    """
    offsets: list[int] = []
    lengths: list[int] = []
    row_starts = [0]
    prompt_lengths: list[int] = []
    bank_rows_needed = 0
    for b, row in enumerate(rows):
        total = 0
        for position, segment in enumerate(row):
            try:
                offset, length = (int(v) for v in segment)
            except (TypeError, ValueError):
                raise ValueError(
                    f"request {b}, segment {position}: expected a (bank_offset, length) pair of ints, "
                    f"got {segment!r}"
                ) from None
            if offset < 0 or length < 0:
                raise ValueError(
                    f"request {b}, segment {position}: bank_offset and length must be >= 0, got "
                    f"offset={offset}, length={length}; bank offsets come from the prompt bank's placement"
                )
            offsets.append(offset)
            lengths.append(length)
            total += length
            if length:
                bank_rows_needed = max(bank_rows_needed, offset + length)
        row_starts.append(len(offsets))
        prompt_lengths.append(total)
    n = len(offsets)
    # One host-to-device copy, then views into it; from pinned memory it does not block the host.
    packed = torch.tensor(offsets + lengths + row_starts, dtype=torch.long)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return SegmentTable(
        offsets=packed[:n],
        lengths=packed[n : 2 * n],
        row_starts=packed[2 * n :],
        prompt_lengths=prompt_lengths,
        bank_rows_needed=bank_rows_needed,
    )


# --------------------------------------------------------------------------------------
# 1. Reference: the definition, one request at a time.
# --------------------------------------------------------------------------------------


def build_encoder_inputs_reference(
    input_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    embedding: torch.Tensor,
    bank: torch.Tensor,
    segments: SegmentTable,
    seq_len: int,
) -> EncoderInputs:
    batch, _ = input_ids.shape
    embeds = embedding.new_zeros(batch, seq_len, embedding.shape[1])  # [B, S, D]
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long, device=embedding.device)  # [B, S]
    offsets = segments.offsets.tolist()
    lengths = segments.lengths.tolist()
    row_starts = segments.row_starts.tolist()
    input_lengths_host = input_lengths.tolist()
    prompt_lengths = []
    for b in range(batch):
        position = 0
        for i in range(row_starts[b], row_starts[b + 1]):
            embeds[b, position : position + lengths[i]] = bank[offsets[i] : offsets[i] + lengths[i]]
            position += lengths[i]
        n_tokens = input_lengths_host[b]
        if position + n_tokens > seq_len:
            raise ValueError(
                f"request {b} needs {position} prompt + {n_tokens} input positions but seq_len is "
                f"{seq_len}; pass seq_len >= max(prompt_length + input_length) over the batch"
            )
        embeds[b, position : position + n_tokens] = embedding[input_ids[b, :n_tokens]]
        attention_mask[b, : position + n_tokens] = 1
        prompt_lengths.append(position)
    prompt_lengths_t = torch.tensor(prompt_lengths, dtype=torch.long, device=embedding.device)
    return EncoderInputs(
        embeds=embeds,
        attention_mask=attention_mask,
        prompt_lengths=prompt_lengths_t,
        total_lengths=prompt_lengths_t + input_lengths.to(embedding.device),
    )


# --------------------------------------------------------------------------------------
# 2. Triton kernel and 3. its launcher.
# --------------------------------------------------------------------------------------


def _prompt_concat_kernel_body(
    input_ids_ptr,  # [B, T] long
    input_lengths_ptr,  # [B] long
    embedding_ptr,  # [V, D]
    bank_ptr,  # [R, D]
    seg_offsets_ptr,  # [N] long
    seg_lengths_ptr,  # [N] long
    row_starts_ptr,  # [B+1] long
    embeds_ptr,  # [B, S, D] out
    mask_ptr,  # [B, S] long out
    prompt_lengths_ptr,  # [B] long out
    total_lengths_ptr,  # [B] long out
    S,
    D,
    stride_ids_b,
    stride_emb_v,
    stride_bank_r,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (request b, block of BLOCK_S positions); it loops over D in blocks."""
    b = tl.program_id(0)
    s_block = tl.program_id(1)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] positions in the row
    in_seq = s < S

    # Walk this row's segments (few: a task prompt, maybe a language prompt) to find, for each
    # position, the bank row it copies; the walk's end is the row's prompt length.
    seg_lo = tl.load(row_starts_ptr + b)
    seg_hi = tl.load(row_starts_ptr + b + 1)
    # tl.full, not tl.zeros: the kernel uses only Triton builtins (no @jit library helpers),
    # so the interpreter also runs it when TRITON_INTERPRET is set after triton was imported.
    bank_row = tl.full([BLOCK_S], 0, tl.int64)
    prompt_len = seg_lo * 0  # int64 scalar, so the loop-carried type stays fixed
    for i in range(seg_lo, seg_hi):
        seg_offset = tl.load(seg_offsets_ptr + i)
        seg_length = tl.load(seg_lengths_ptr + i)
        in_segment = (s >= prompt_len) & (s < prompt_len + seg_length)
        bank_row = tl.where(in_segment, seg_offset + (s - prompt_len), bank_row)
        prompt_len += seg_length
    n_tokens = tl.load(input_lengths_ptr + b)
    total_len = prompt_len + n_tokens

    is_prompt = in_seq & (s < prompt_len)
    is_token = in_seq & (s >= prompt_len) & (s < total_len)
    token_id = tl.load(input_ids_ptr + b * stride_ids_b + (s - prompt_len), mask=is_token, other=0)

    tl.store(mask_ptr + b * S + s, is_token.to(tl.int64) + is_prompt.to(tl.int64), mask=in_seq)
    if s_block == 0:
        tl.store(prompt_lengths_ptr + b, prompt_len)
        tl.store(total_lengths_ptr + b, total_len)

    bank_rows = bank_ptr + bank_row[:, None] * stride_bank_r  # [BLOCK_S, 1]
    token_rows = embedding_ptr + token_id[:, None] * stride_emb_v  # [BLOCK_S, 1]
    out_rows = embeds_ptr + (b * S + s)[:, None].to(tl.int64) * D  # [BLOCK_S, 1]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        in_d = (d < D)[None, :]
        # Masked loads return 0 where the lane is off, so padding comes out as zeros and each
        # position reads from exactly one source: a select, never arithmetic on values.
        from_bank = tl.load(bank_rows + d[None, :], mask=is_prompt[:, None] & in_d, other=0)
        from_tokens = tl.load(token_rows + d[None, :], mask=is_token[:, None] & in_d, other=0)
        value = tl.where(is_prompt[:, None], from_bank, from_tokens)  # [BLOCK_S, BLOCK_D]
        tl.store(out_rows + d[None, :], value, mask=in_seq[:, None] & in_d)


def _triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _compiled_kernel(interpret: bool) -> Callable:
    """The kernel, built on first use so TRITON_INTERPRET is read when Triton is asked for.

    Cached per mode: a process may run the interpreter on CPU tensors in one test and the
    compiled kernel on CUDA in another.
    """
    if triton is None:
        raise RuntimeError(
            "backend='triton' needs the triton package; install it with `pip install triton` "
            "(the `gpu` or `kernels` extra), or use backend='torch'"
        )
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_prompt_concat_kernel_body)
    return triton.jit(_prompt_concat_kernel_body)


def build_encoder_inputs_triton(
    input_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    embedding: torch.Tensor,
    bank: torch.Tensor,
    segments: SegmentTable,
    seq_len: int,
    *,
    block_s: int = 16,
    block_d: int = 128,
) -> EncoderInputs:
    """One kernel launch writes embeds, mask and both length vectors; no host sync."""
    interpret = _triton_interpret_enabled()
    if embedding.device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"backend='triton' got tensors on {embedding.device}, but the compiled Triton kernel "
            "runs on CUDA only; move the tensors to a CUDA device, use backend='torch' on CPU, or set "
            "TRITON_INTERPRET=1 in the environment to run the kernel in Triton's (slow) interpreter"
        )
    kernel = _compiled_kernel(interpret)
    batch = input_ids.shape[0]
    dim = embedding.shape[1]
    device = embedding.device
    embeds = torch.empty(batch, seq_len, dim, dtype=embedding.dtype, device=device)  # [B, S, D]
    attention_mask = torch.empty(batch, seq_len, dtype=torch.long, device=device)  # [B, S]
    prompt_lengths = torch.empty(batch, dtype=torch.long, device=device)  # [B]
    total_lengths = torch.empty(batch, dtype=torch.long, device=device)  # [B]
    if batch == 0 or seq_len == 0:
        return EncoderInputs(embeds, attention_mask, prompt_lengths.zero_(), total_lengths.zero_())
    block_d = min(block_d, max(16, 1 << (dim - 1).bit_length()))
    grid = (batch, (seq_len + block_s - 1) // block_s)
    kernel[grid](
        input_ids,
        input_lengths,
        embedding,
        bank,
        segments.offsets,
        segments.lengths,
        segments.row_starts,
        embeds,
        attention_mask,
        prompt_lengths,
        total_lengths,
        seq_len,
        dim,
        input_ids.stride(0),
        embedding.stride(0),
        bank.stride(0),
        BLOCK_S=block_s,
        BLOCK_D=block_d,
    )
    return EncoderInputs(embeds, attention_mask, prompt_lengths, total_lengths)


# --------------------------------------------------------------------------------------
# 4. Vectorised PyTorch path.
# --------------------------------------------------------------------------------------


def build_encoder_inputs_torch(
    input_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    embedding: torch.Tensor,
    bank: torch.Tensor,
    segments: SegmentTable,
    seq_len: int,
) -> EncoderInputs:
    """Index arithmetic on device, then one bank gather that writes every output row; no sync.

    Memory traffic is what costs here, so the output is written by the bank gather itself
    (positions that are not prompt read a dummy bank row), then the token rows are scattered
    over it and the padding rows zeroed: no zero-filled buffer, no prompt-sized temporary.
    Sizes the device cannot know without a sync (segment count, total prompt rows) come from
    the host-side SegmentTable, so every repeat_interleave gets its output_size.
    """
    batch, tokens = input_ids.shape
    dim = embedding.shape[1]
    device = embedding.device
    n_segments = segments.offsets.numel()
    n_prompt_rows = sum(segments.prompt_lengths)
    # Rows of the flat output [B*S + 1, D]: the last one is scratch, where every row that
    # must be dropped is sent, so no boolean indexing (and no sync) is needed.
    scratch_row = batch * seq_len

    # Per-row prompt lengths from the segment lengths: prefix sums read at the CSR bounds.
    seg_ends = torch.cumsum(segments.lengths, 0)  # [N]
    seg_prefix = torch.cat([torch.zeros(1, dtype=torch.long, device=device), seg_ends])  # [N+1]
    row_prompt_start = seg_prefix[segments.row_starts]  # [B+1] flat start of each row's prompt
    prompt_lengths = row_prompt_start[1:] - row_prompt_start[:-1]  # [B]
    total_lengths = prompt_lengths + input_lengths  # [B]
    positions = torch.arange(seq_len, device=device)  # [S]
    attention_mask = (positions[None, :] < total_lengths[:, None]).long()  # [B, S]

    if n_prompt_rows:
        # Within a segment, bank row and output row both advance by one per prompt row, so
        # each is (flat prompt index + a per-segment constant). Build the two constants per
        # segment, spread them over the rows with one repeat_interleave, add the flat index.
        seg_rows_count = segments.row_starts[1:] - segments.row_starts[:-1]  # [B]
        seg_row = torch.repeat_interleave(
            torch.arange(batch, device=device), seg_rows_count, output_size=n_segments
        )  # [N] request of each segment
        bank_shift = segments.offsets - seg_prefix[:-1]  # [N]
        dest_shift = seg_row * seq_len - row_prompt_start[seg_row]  # [N]
        shifts = torch.repeat_interleave(
            torch.stack([bank_shift, dest_shift]), segments.lengths, dim=1, output_size=n_prompt_rows
        )  # [2, P_total]
        bank_index, prompt_dest = shifts + torch.arange(n_prompt_rows, device=device)  # [P_total] each
        # Bank row for every output row; rows that are not prompt read bank row 0 and are
        # overwritten (tokens) or zeroed (padding) below.
        source = torch.zeros(batch * seq_len + 1, dtype=torch.long, device=device)  # [B*S+1]
        source.index_copy_(0, prompt_dest, bank_index)
        flat = bank.index_select(0, source)  # [B*S+1, D]
    else:
        flat = embedding.new_empty(batch * seq_len + 1, dim)  # [B*S+1, D] every row set below

    if tokens:
        t = torch.arange(tokens, device=device)  # [T]
        valid = t[None, :] < input_lengths[:, None]  # [B, T]
        token_dest = torch.arange(batch, device=device)[:, None] * seq_len + prompt_lengths[:, None] + t  # [B, T]
        token_dest = torch.where(valid, token_dest, scratch_row)
        # Padding ids may be anything (e.g. -100): read row 0 for them, it lands in scratch.
        token_ids = torch.where(valid, input_ids, 0)  # [B, T]
        flat.index_copy_(0, token_dest.reshape(-1), embedding.index_select(0, token_ids.reshape(-1)))

    embeds = flat[:scratch_row].view(batch, seq_len, dim)  # [B, S, D]
    # masked_fill writes only the padding rows; it never does arithmetic on the copied values.
    embeds.masked_fill_((attention_mask == 0)[..., None], 0)
    return EncoderInputs(embeds, attention_mask, prompt_lengths, total_lengths)


# --------------------------------------------------------------------------------------
# 5. Dispatcher.
# --------------------------------------------------------------------------------------

_IMPLEMENTATIONS = {
    "reference": build_encoder_inputs_reference,
    "torch": build_encoder_inputs_torch,
    "triton": build_encoder_inputs_triton,
}


def build_encoder_inputs(
    input_ids: torch.Tensor,  # [B, T] long, right-padded
    input_lengths: torch.Tensor,  # [B] long, valid tokens per row, 0..T
    embedding: torch.Tensor,  # [V, D] token-embedding table (model.shared.weight)
    bank: torch.Tensor,  # [R, D] prompt bank rows, same dtype/device as embedding
    segments: SegmentTable,
    seq_len: int,  # S, host int >= max(prompt + input length)
    backend: str = "auto",  # "auto" | "triton" | "torch" | "reference"
) -> EncoderInputs:
    """The encoder input of a mixed batch: [prompt segments; token embeddings; zeros] + mask.

    "auto" runs the Triton kernel on CUDA when triton imports, else the PyTorch path.
    Checks here read shapes, dtypes and devices only: nothing waits on the device.
    """
    _check_inputs(input_ids, input_lengths, embedding, bank, segments, seq_len)
    if backend == "auto":
        backend = "triton" if embedding.device.type == "cuda" and triton is not None else "torch"
    try:
        implementation = _IMPLEMENTATIONS[backend]
    except KeyError:
        raise ValueError(
            f"unknown prompt-concat backend {backend!r}; expected one of {', '.join(BACKENDS)} "
            "(EngineConfig.concat_backend)"
        ) from None
    return implementation(input_ids, input_lengths, embedding, bank, segments, seq_len)


def _check_inputs(
    input_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    embedding: torch.Tensor,
    bank: torch.Tensor,
    segments: SegmentTable,
    seq_len: int,
) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a [B, T] torch.long tensor, got shape {tuple(input_ids.shape)} "
            f"and dtype {input_ids.dtype}"
        )
    batch, tokens = input_ids.shape
    if input_lengths.shape != (batch,) or input_lengths.dtype != torch.long:
        raise ValueError(
            f"input_lengths must be a [B]={batch} torch.long tensor (valid tokens per row), got shape "
            f"{tuple(input_lengths.shape)} and dtype {input_lengths.dtype}"
        )
    if embedding.dim() != 2 or bank.dim() != 2 or bank.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"embedding must be [V, D] and bank [R, D] with the same D, got {tuple(embedding.shape)} "
            f"and {tuple(bank.shape)}; prompts must have the model's d_model"
        )
    if bank.dtype != embedding.dtype or bank.device != embedding.device:
        raise ValueError(
            f"bank must match the embedding table's dtype and device, got bank {bank.dtype} on "
            f"{bank.device} and embedding {embedding.dtype} on {embedding.device}; allocate the prompt "
            "bank like model.shared.weight"
        )
    if embedding.stride(1) != 1 or bank.stride(1) != 1:
        raise ValueError("embedding and bank rows must be contiguous (stride 1 along D); call .contiguous()")
    for name, tensor in (("input_ids", input_ids), ("input_lengths", input_lengths)):
        if tensor.device != embedding.device:
            raise ValueError(
                f"{name} is on {tensor.device} but the embedding table is on {embedding.device}; "
                f"move {name} to {embedding.device} first"
            )
    table = (segments.offsets, segments.lengths, segments.row_starts)
    if any(t.device != embedding.device for t in table):
        raise ValueError(
            f"the SegmentTable lives on {segments.offsets.device} but the embedding table is on "
            f"{embedding.device}; build it with pack_segments(rows, device={str(embedding.device)!r})"
        )
    if segments.row_starts.shape != (batch + 1,) or len(segments.prompt_lengths) != batch:
        raise ValueError(
            f"the SegmentTable describes {len(segments.prompt_lengths)} requests but input_ids has "
            f"{batch} rows; pack one segment list per request, in batch order"
        )
    if not segments.row_starts.is_contiguous() or input_ids.stride(1) != 1:
        raise ValueError("input_ids rows and the SegmentTable tensors must be contiguous; call .contiguous()")
    if segments.bank_rows_needed > bank.shape[0]:
        raise ValueError(
            f"the segments read bank rows up to {segments.bank_rows_needed} but the bank has "
            f"{bank.shape[0]} rows; the segment offsets must come from this bank's placement"
        )
    longest_prompt = max(segments.prompt_lengths, default=0)
    if seq_len < longest_prompt:
        raise ValueError(
            f"seq_len={seq_len} is shorter than the longest prompt ({longest_prompt} rows); pass "
            "seq_len >= max(prompt_length + input_length) over the batch"
        )
    if input_lengths.device.type == "cpu" and batch:
        # On CPU this costs no device sync, so check the full contract.
        needed = max(p + n for p, n in zip(segments.prompt_lengths, input_lengths.tolist()))
        too_long = int(input_lengths.max()) > tokens or int(input_lengths.min()) < 0
        if too_long:
            raise ValueError(f"input_lengths must lie in 0..T={tokens}, got {input_lengths.tolist()}")
        if seq_len < needed:
            raise ValueError(
                f"seq_len={seq_len} is shorter than the longest request ({needed} prompt + input "
                "positions); pass seq_len >= max(prompt_length + input_length) over the batch"
            )
