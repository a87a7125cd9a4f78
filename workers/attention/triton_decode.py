"""Paged decode attention in Triton (cache layout and shared pieces: triton_common.py).

- paged_decode_attention: one query token per sequence. Grid (kv_head, seq, split): a program
  takes every query head of its kv head (GQA group padded to 16 rows for tl.dot) over one
  contiguous slice of the context, with an online softmax; a second kernel merges the splits by
  their log-sum-exp. The grid depends only on (num_seqs, num_kv_heads, num_splits): each split's
  slice is computed on the device from seq_lens, so one captured graph serves any context length.
- row groups (optional): consecutive rows that are one sequence's query tokens (a prefix-cache
  hit's few new tokens as decode rows) share a program, which reads each K/V tile once for all
  of them: the GQA group fills only GROUP of the tile's 16 rows, and the other rows are free.
"""
import torch
import triton
import triton.language as tl

from workers.attention.triton_common import (
    LOG2E, NEG_INIT, attend_tile, attention_operands, dot_precision, merge_splits, merge_splits_into,
    split_partials)
from workers.attention.row_groups import decode_tile_rows
from workers.layers.pdl import launch_options, pdl_enter, use_pdl


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, order_ptr, row_groups_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, ORDERED: tl.constexpr,
    ROW_GROUPS: tl.constexpr, USE_PDL: tl.constexpr,
):
    # kv head fastest: the GPU starts programs in grid order, so with ORDERED (sequences longest
    # first) the longest programs start first and the last wave holds the shortest ones
    kv_head = tl.program_id(0)
    s = tl.load(order_ptr + tl.program_id(1)) if ORDERED else tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if ROW_GROUPS:
        # row s leads row_groups[s] rows (s, s + 1, ...) of one sequence, which share its block
        # table; 0: an earlier row's program takes it. Tile row i is query row s + i // GROUP,
        # head i % GROUP, and attends to its own row's context (causal within the query)
        num_rows = tl.load(row_groups_ptr + s)
        if num_rows == 0:
            return
        rows = s + offs_h // GROUP
        heads = kv_head * GROUP + offs_h % GROUP
        h_mask = offs_h < num_rows * GROUP
        row_len = tl.load(seq_lens_ptr + rows, mask=h_mask, other=0)
        seq_len = tl.max(row_len, 0)  # the last row's: the slices cover every row's context
        q_row, o_row, p_row, l_row = (rows[:, None] * stride_qt, rows[:, None] * stride_ot,
                                      rows[:, None] * stride_pt, rows * stride_lt)
    else:
        heads = kv_head * GROUP + offs_h
        h_mask = offs_h < GROUP
        seq_len = tl.load(seq_lens_ptr + s)
        row_len = seq_len
        q_row, o_row, p_row, l_row = s * stride_qt, s * stride_ot, s * stride_pt, s * stride_lt
    # each split takes a BLOCK_N-aligned slice of the context; trailing splits may be empty
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    kv_head_off = kv_head * stride_kh
    # seq_lens (and row_groups) are step inputs and the order is sorted once, by torch kernels
    # before the first layer's attention (without PDL, so complete before this one starts): none
    # comes from the kernel right before (the q/k kernel), so with PDL their dependent loads run
    # while it finishes
    pdl_enter(USE_PDL)

    q = tl.load(q_ptr + q_row + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = attend_tile(
            q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
            stride_kb, stride_kt, offs_d, d_mask, end, row_len - 1, qk_scale,
            BLOCK_SIZE, BLOCK_N, ROW_GROUPS, DOT_PREC)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context (padding row) -> 0
    o_mask = h_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:
        tl.store(out_ptr + o_row + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(part_out_ptr + p_row + heads[:, None] * stride_ph + split * stride_ps
                 + offs_d[None, :], out, mask=o_mask)
        lse = m_i + tl.log2(l_i)  # log2 domain; -inf for an empty split
        tl.store(part_lse_ptr + l_row + heads * stride_lh + split, lse, mask=h_mask)
        if FUSED_MERGE:
            # the last split to finish merges all of its (seq, kv head), then rearms the counter
            counter = counters_ptr + s * tl.num_programs(0) + kv_head
            tl.debug_barrier()  # every thread's partial stores come before the release
            ticket = tl.atomic_add(counter, 1, sem="acq_rel")
            if ticket == num_splits - 1:
                merge_splits(part_out_ptr, part_lse_ptr, out_ptr, s, heads, h_mask, offs_d, d_mask,
                             num_splits, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                             stride_ot, stride_oh, BLOCK_H, BLOCK_D, BLOCK_S)
                tl.store(counter, 0)


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one token per sequence
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32, 0 gives a zero output row
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    fused_merge: bool = False,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    order: torch.Tensor | None = None,  # [S] int32, a permutation of the rows: longest context first
    row_groups: torch.Tensor | None = None,  # [S] int32: rows each row's program takes (0: none)
) -> torch.Tensor:
    """Split-KV decode: the splits' partial outputs are merged by a second kernel.

    order: the sequence each row of programs takes. With mixed context lengths and more programs
    than the SMs hold at once, programs in batch order can leave one long context running alone
    at the end; longest first, the shortest run last (the outputs are the same either way).

    fused_merge (off by default): the last split of each (seq, kv head) merges instead, saving
    the second launch; it needs counters, int32 [>= S * Hkv], zero on entry and left zero on
    exit (torch.zeros per call when not given). Its merge walks the splits one by one, so it
    won 0.3 us at <= 4 splits and lost 1-25 us at >= 5 on an H200 (docs/notes-attention.md).

    row_groups: rows that are one sequence's consecutive query tokens, each with its own seq_len
    (its position + 1) and the same block table, go to one program: row_groups[s] = g makes row
    s's programs take rows s .. s + g - 1, and each of those rows other than s holds 0. A plain
    decode row holds 1. g is at most rows_per_program(group); workers/attention/row_groups.py
    lays them out.
    Not with fused_merge."""
    num_seqs, _, head_dim = query.shape
    k_cache, v_cache, num_kv_heads, group, out = attention_operands(query, kv_cache, out)
    assert row_groups is None or not fused_merge, "row groups are merged by the separate kernel"
    block_d = triton.next_power_of_2(head_dim)
    one_split = num_splits == 1
    part_out, part_lse, part_strides = split_partials(out, num_splits)
    fused_merge = fused_merge and not one_split
    if fused_merge and counters is None:
        counters = torch.zeros(num_seqs * num_kv_heads, dtype=torch.int32, device=query.device)
    elif not fused_merge:
        counters = seq_lens  # unused
    pdl = use_pdl(query)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, order if order is not None else seq_lens,
        row_groups if row_groups is not None else seq_lens, out, part_out, part_lse, counters,
        scale * LOG2E, num_splits,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *part_strides,
        GROUP=group, BLOCK_H=decode_tile_rows(group), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, ONE_SPLIT=one_split,
        FUSED_MERGE=fused_merge, BLOCK_S=triton.next_power_of_2(num_splits),
        DOT_PREC=dot_precision(query.dtype), ORDERED=order is not None, ROW_GROUPS=row_groups is not None,
        USE_PDL=pdl, num_warps=num_warps,
        num_stages=num_stages, **launch_options(pdl))
    if not one_split and not fused_merge:
        merge_splits_into(out, part_out, part_lse, part_strides, num_splits)
    return out

