"""The fused prompt-concat op: every backend equals a per-request cat-and-pad loop, bit for bit.

The Triton kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, read
when the op is called), so CI without a GPU still checks the kernel's logic; a compile-only
test checks that the same kernel lowers to a CUDA binary.
"""
from __future__ import annotations

import random

import pytest
import torch

from promptmux.kernels.prompt_concat import (
    EncoderInputs,
    SegmentTable,
    build_encoder_inputs,
    pack_segments,
)

VOCAB = 61
BANK_ROWS = 48


def naive_concat_and_pad(input_ids, input_lengths, embedding, bank, rows, seq_len) -> EncoderInputs:
    """The obvious per-request loop: torch.cat the pieces, pad with zeros, stack."""
    embeds, masks, prompt_lengths = [], [], []
    for b, segments in enumerate(rows):
        pieces = [bank[offset : offset + length] for offset, length in segments]
        pieces.append(embedding[input_ids[b, : int(input_lengths[b])]])
        row = torch.cat(pieces)  # [P_b + L_b, D]
        pad = row.new_zeros(seq_len - row.shape[0], row.shape[1])
        embeds.append(torch.cat([row, pad]))
        masks.append(torch.tensor([1] * row.shape[0] + [0] * pad.shape[0]))
        prompt_lengths.append(sum(length for _, length in segments))
    prompt = torch.tensor(prompt_lengths, dtype=torch.long)
    return EncoderInputs(
        embeds=torch.stack(embeds),
        attention_mask=torch.stack(masks).long(),
        prompt_lengths=prompt,
        total_lengths=prompt + input_lengths.cpu(),
    )


def make_batch(batch: int, dim: int, dtype: torch.dtype, seed: int, device="cpu", slack: int = 5):
    """Awkward mixed batch: 0-3 segments per row (zero-length ones included), empty prompts,
    empty inputs next to full ones, garbage ids in the padding, S larger than needed."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(VOCAB, dim, generator=gen).to(dtype)
    bank = torch.randn(BANK_ROWS, dim, generator=gen).to(dtype)
    tokens = 7
    rows = []
    for b in range(batch):
        n_segments = rng.choice([0, 1, 1, 2, 3])
        segments = []
        for _ in range(n_segments):
            length = rng.choice([0, 1, 4, 6])
            segments.append((rng.randrange(0, BANK_ROWS - length + 1), length))
        rows.append(segments)
    lengths = [rng.choice([0, 1, 3, tokens]) for _ in range(batch)]
    if batch > 1:
        lengths[0], lengths[1] = tokens, 0  # an empty input beside a full one
    input_lengths = torch.tensor(lengths, dtype=torch.long)
    input_ids = torch.randint(0, VOCAB, (batch, tokens), generator=gen)
    pad = torch.arange(tokens)[None, :] >= input_lengths[:, None]
    input_ids = torch.where(pad, torch.full_like(input_ids, -100), input_ids)  # ids never read
    seq_len = max(sum(n for _, n in r) + l for r, l in zip(rows, lengths)) + slack
    moved = [t.to(device) for t in (input_ids, input_lengths, embedding, bank)]
    return (*moved, rows, seq_len)


def assert_same(actual: EncoderInputs, expected: EncoderInputs) -> None:
    # Bit-exact: compare raw bits so -0.0 vs 0.0 or NaN payloads would also show.
    assert actual.embeds.dtype == expected.embeds.dtype
    assert actual.embeds.shape == expected.embeds.shape
    bits = torch.int16 if actual.embeds.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(actual.embeds.cpu().view(bits), expected.embeds.cpu().view(bits))
    assert actual.attention_mask.dtype == torch.long
    assert torch.equal(actual.attention_mask.cpu(), expected.attention_mask.cpu())
    assert actual.prompt_lengths.dtype == torch.long and actual.total_lengths.dtype == torch.long
    assert torch.equal(actual.prompt_lengths.cpu(), expected.prompt_lengths.cpu())
    assert torch.equal(actual.total_lengths.cpu(), expected.total_lengths.cpu())


CASES = [
    (batch, dim, dtype)
    for batch in (1, 3, 17)
    for dim, dtype in ((24, torch.float32), (100, torch.bfloat16), (100, torch.float32), (24, torch.bfloat16))
]


@pytest.mark.parametrize("batch,dim,dtype", CASES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backend_matches_naive_loop(backend, batch, dim, dtype):
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(batch, dim, dtype, seed=batch * dim)
    out = build_encoder_inputs(
        input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len, backend=backend
    )
    assert_same(out, naive_concat_and_pad(input_ids, input_lengths, embedding, bank, rows, seq_len))


@pytest.mark.parametrize("batch,dim,dtype", CASES)
def test_triton_interpreter_matches_naive_loop(monkeypatch, batch, dim, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(batch, dim, dtype, seed=batch * dim)
    out = build_encoder_inputs(
        input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len, backend="triton"
    )
    assert_same(out, naive_concat_and_pad(input_ids, input_lengths, embedding, bank, rows, seq_len))


def test_triton_interpreter_with_several_d_blocks_and_s_blocks(monkeypatch):
    """D over one block and a sequence spanning several position blocks: the loops in the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(2, 300, torch.float32, seed=7, slack=20)
    out = build_encoder_inputs(
        input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len, backend="triton"
    )
    assert seq_len > 16 and embedding.shape[1] > 128
    assert_same(out, naive_concat_and_pad(input_ids, input_lengths, embedding, bank, rows, seq_len))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_batch_without_any_prompt_or_any_token(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    embedding = torch.randn(VOCAB, 24)
    bank = torch.randn(BANK_ROWS, 24)
    no_prompts = pack_segments([[], [(5, 0)]], "cpu")
    ids = torch.tensor([[3, 4, 5], [6, 0, 0]])
    out = build_encoder_inputs(ids, torch.tensor([3, 1]), embedding, bank, no_prompts, 4, backend=backend)
    assert torch.equal(out.embeds[0, :3], embedding[[3, 4, 5]])
    assert torch.equal(out.embeds[1, :1], embedding[[6]])
    assert torch.equal(out.attention_mask, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))

    prompts_only = pack_segments([[(2, 3)], [(10, 1), (0, 2)]], "cpu")
    no_tokens = torch.zeros(2, 0, dtype=torch.long)
    out = build_encoder_inputs(no_tokens, torch.tensor([0, 0]), embedding, bank, prompts_only, 3, backend=backend)
    assert torch.equal(out.embeds[0], bank[2:5])
    assert torch.equal(out.embeds[1], bank[[10, 0, 1]])
    assert torch.equal(out.total_lengths, torch.tensor([3, 3]))


def test_auto_uses_torch_on_cpu_and_matches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(3, 24, torch.float32, seed=1)
    out = build_encoder_inputs(input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len)
    assert_same(out, naive_concat_and_pad(input_ids, input_lengths, embedding, bank, rows, seq_len))


def test_triton_on_cpu_without_interpreter_explains_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(1, 24, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="CUDA only.*backend='torch'.*TRITON_INTERPRET=1"):
        build_encoder_inputs(
            input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len, backend="triton"
        )


def test_unknown_backend_lists_the_valid_ones():
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(1, 24, torch.float32, seed=3)
    with pytest.raises(ValueError, match="unknown prompt-concat backend 'cuda'.*auto, triton, torch, reference"):
        build_encoder_inputs(
            input_ids, input_lengths, embedding, bank, pack_segments(rows, "cpu"), seq_len, backend="cuda"
        )


def test_contract_violations_are_rejected_before_any_copy():
    embedding = torch.randn(VOCAB, 24)
    bank = torch.randn(BANK_ROWS, 24)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="seq_len=4 is shorter than the longest request \\(5 prompt"):
        build_encoder_inputs(ids, torch.tensor([3]), embedding, bank, pack_segments([[(0, 2)]], "cpu"), 4)
    with pytest.raises(ValueError, match="bank rows up to 50 but the bank has 48 rows"):
        build_encoder_inputs(ids, torch.tensor([3]), embedding, bank, pack_segments([[(46, 4)]], "cpu"), 8)
    with pytest.raises(ValueError, match="bank must match the embedding table's dtype"):
        build_encoder_inputs(ids, torch.tensor([3]), embedding, bank.bfloat16(), pack_segments([[]], "cpu"), 8)
    with pytest.raises(ValueError, match="describes 2 requests but input_ids has 1 rows"):
        build_encoder_inputs(ids, torch.tensor([3]), embedding, bank, pack_segments([[], []], "cpu"), 8)
    with pytest.raises(ValueError, match="input_lengths must lie in 0..T=3"):
        build_encoder_inputs(ids, torch.tensor([4]), embedding, bank, pack_segments([[]], "cpu"), 8)


def test_pack_segments_layout_and_errors():
    table = pack_segments([[(4, 2), (9, 0), (0, 3)], [], [(7, 1)]], "cpu")
    assert isinstance(table, SegmentTable)
    assert table.offsets.tolist() == [4, 9, 0, 7]
    assert table.lengths.tolist() == [2, 0, 3, 1]
    assert table.row_starts.tolist() == [0, 3, 3, 4]
    assert table.prompt_lengths == [5, 0, 1]
    assert table.bank_rows_needed == 8
    assert all(t.dtype == torch.long for t in (table.offsets, table.lengths, table.row_starts))
    with pytest.raises(ValueError, match="request 1, segment 0: bank_offset and length must be >= 0"):
        pack_segments([[], [(-1, 2)]], "cpu")
    with pytest.raises(ValueError, match="request 0, segment 1: expected a \\(bank_offset, length\\) pair"):
        pack_segments([[(0, 1), (2,)]], "cpu")


def test_kernel_compiles_for_cuda_without_a_gpu():
    """Lower the kernel to a sm_80 binary: catches type errors the interpreter lets through."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from promptmux.kernels.prompt_concat import _prompt_concat_kernel_body

    for dtype in ("fp32", "bf16"):
        signature = {
            **{name: "*i64" for name in ("input_ids_ptr", "input_lengths_ptr")},
            **{name: f"*{dtype}" for name in ("embedding_ptr", "bank_ptr")},
            **{name: "*i64" for name in ("seg_offsets_ptr", "seg_lengths_ptr", "row_starts_ptr")},
            "embeds_ptr": f"*{dtype}",
            **{name: "*i64" for name in ("mask_ptr", "prompt_lengths_ptr", "total_lengths_ptr")},
            **{name: "i32" for name in ("S", "D", "stride_ids_b", "stride_emb_v", "stride_bank_r")},
            "BLOCK_S": "constexpr",
            "BLOCK_D": "constexpr",
        }
        source = ASTSource(
            # JITFunction directly: triton.jit would hand back the interpreter under TRITON_INTERPRET=1.
            JITFunction(_prompt_concat_kernel_body), signature, constexprs={"BLOCK_S": 16, "BLOCK_D": 128}
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32))
        assert compiled.asm["cubin"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch,dim,dtype", CASES + [(64, 4096, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_cuda_backends_match_naive_loop(monkeypatch, backend, batch, dim, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    input_ids, input_lengths, embedding, bank, rows, seq_len = make_batch(
        batch, dim, dtype, seed=batch + dim, device="cuda"
    )
    segments = pack_segments(rows, "cuda")
    # First call compiles the Triton kernel; compiling is not the hot path, so warm up first.
    build_encoder_inputs(input_ids, input_lengths, embedding, bank, segments, seq_len, backend=backend)
    torch.cuda.synchronize()
    # The op must never wait on the device: S and every size it needs come from the host.
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = build_encoder_inputs(input_ids, input_lengths, embedding, bank, segments, seq_len, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.embeds.device.type == "cuda"
    expected = naive_concat_and_pad(
        input_ids.cpu(), input_lengths.cpu(), embedding.cpu(), bank.cpu(), rows, seq_len
    )
    assert_same(out, expected)
