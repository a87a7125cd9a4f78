"""Triton kernels over the paged KV cache of workers/attention/base.py.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
Every kernel computes in float32 and folds the softmax scale into exp2 (qk_scale = scale * log2 e).

- reshape_and_cache: one program per new token; slot -1 is skipped (CUDA-graph padding).
- paged_decode_attention: one query token per sequence. Grid (kv_head, seq, split): a program
  takes every query head of its kv head (GQA group padded to 16 rows for tl.dot) over one
  contiguous slice of the context, with an online softmax; a second kernel merges the splits by
  their log-sum-exp. The grid depends only on (num_seqs, num_kv_heads, num_splits): each split's
  slice is computed on the device from seq_lens, so one captured graph serves any context length.
- paged_prefill_attention: varlen flash attention. Grid (kv_head, query tile of any sequence); a
  tile packs BLOCK_M // group query tokens times the group's heads as its rows, so K/V are read
  once per kv head. Queries attend to the cached prefix and causally to themselves, all read from
  the cache. Few tiles over a long context split the keys instead: a fixed number of programs per
  kv head walks the (tile, key slice) items, merged as the decode splits are.
"""
import torch
import triton
import triton.language as tl

from workers.layers.pdl import launch_options, pdl_enter, use_pdl

LOG2E = 1.4426950408889634
NEG_INIT = tl.constexpr(-1.0e30)  # finite running-max start: exp2(-inf - NEG_INIT) = 0, never NaN


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _attend_tile(
    q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
    stride_kb, stride_kt, offs_d, d_mask, key_end, q_pos, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One BLOCK_N tile of keys: gather K/V through the block table, online-softmax update."""
    pos = n0 + tl.arange(0, BLOCK_N)
    n_mask = pos < key_end
    page = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    kv_off = page[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_kt \
        + kv_head_off + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [rows, BLOCK_N]
    if CAUSAL:
        valid = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
    else:
        valid = n_mask[None, :]
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, order_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, ORDERED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    # kv head fastest: the GPU starts programs in grid order, so with ORDERED (sequences longest
    # first) the longest programs start first and the last wave holds the shortest ones
    kv_head = tl.program_id(0)
    s = tl.load(order_ptr + tl.program_id(1)) if ORDERED else tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    # each split takes a BLOCK_N-aligned slice of the context; trailing splits may be empty
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + s * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
    kv_head_off = kv_head * stride_kh
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
            stride_kb, stride_kt, offs_d, d_mask, end, offs_h, qk_scale,
            BLOCK_SIZE, BLOCK_N, False, DOT_PREC)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context (padding row) -> 0
    o_mask = h_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:
        tl.store(out_ptr + s * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(part_out_ptr + s * stride_pt + heads[:, None] * stride_ph + split * stride_ps
                 + offs_d[None, :], out, mask=o_mask)
        lse = m_i + tl.log2(l_i)  # log2 domain; -inf for an empty split
        tl.store(part_lse_ptr + s * stride_lt + heads * stride_lh + split, lse, mask=h_mask)
        if FUSED_MERGE:
            # the last split to finish merges all of its (seq, kv head), then rearms the counter
            counter = counters_ptr + s * tl.num_programs(0) + kv_head
            tl.debug_barrier()  # every thread's partial stores come before the release
            ticket = tl.atomic_add(counter, 1, sem="acq_rel")
            if ticket == num_splits - 1:
                _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, s, heads, h_mask, offs_d, d_mask,
                              num_splits, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                              stride_ot, stride_oh, BLOCK_H, BLOCK_D, BLOCK_S)
                tl.store(counter, 0)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, s, heads, h_mask, offs_d, d_mask, num_splits,
                  stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[s, heads] = sum_i w_i o_i / sum_i w_i, w_i = exp2(lse_i - max lse); .cg reads skip L1."""
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = part_lse_ptr + s * stride_lt + heads * stride_lh  # [BLOCK_H] pointers
    lse = tl.load(lse_row[:, None] + offs_s[None, :],
                  mask=h_mask[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"),
                  cache_modifier=".cg")
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m[:, None]), 1)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    o_rows = part_out_ptr + s * stride_pt + heads[:, None] * stride_ph + offs_d[None, :]
    for i in range(num_splits):
        w = tl.exp2(tl.load(lse_row + i, mask=h_mask, other=float("-inf"), cache_modifier=".cg") - m)
        o = tl.load(o_rows + i * stride_ps, mask=(w > 0)[:, None] & d_mask[None, :], other=0.0,
                    cache_modifier=".cg")
        acc += o * w[:, None]
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + s * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, num_rows_ptr,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ROW_LIMIT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per (row, head): a decode sequence, or a prefill query token."""
    pdl_enter(USE_PDL)
    s = tl.program_id(0)
    head = tl.program_id(1)
    if ROW_LIMIT:
        if s >= tl.load(num_rows_ptr):
            return  # a CUDA graph's padding token: no tile wrote its partials
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + s * stride_lt + head * stride_lh + offs_s,
                  mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    live = w > 0
    o = tl.load(part_out_ptr + s * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                + offs_d[None, :], mask=live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + s * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _prefill_tile(
    flat, split, kv_head, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, tile_starts_ptr, tile_seq_ptr, out_ptr, part_out_ptr, part_lse_ptr, num_splits,
    qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query tile `flat` (numbered over every sequence's tiles) against one slice of its keys."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile; rows are (token, head) pairs
    s = tl.load(tile_seq_ptr + flat)
    tile = flat - tl.load(tile_starts_ptr + s)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    ctx_len = seq_len - q_len  # tokens already in the cache before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = tile * TOKENS + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    m_mask = (tok < q_len) & (offs_m < TOKENS * GROUP)  # a group that is no power of 2 leaves spare rows
    d_mask = offs_d < HEAD_DIM
    row_q = (q_start + tok).to(tl.int64)
    q_pos = ctx_len + tok  # absolute position of each row's query token

    # keys [0, first query position] are visible to every row of the tile: no causal mask there
    first_pos = ctx_len + tile * TOKENS
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    key_end = tl.minimum(first_pos + TOKENS, seq_len)
    # this split's BLOCK_N-aligned slice of the tile's keys (all of them when ONE_SPLIT)
    split_len = tl.cdiv(tl.cdiv(key_end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, key_end)
    if lo < hi:
        q = tl.load(q_ptr + row_q[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
        kv_head_off = kv_head * stride_kh
        for n0 in range(lo, tl.minimum(full_end, hi), BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
                stride_kb, stride_kt, offs_d, d_mask, hi, q_pos, qk_scale,
                BLOCK_SIZE, BLOCK_N, False, DOT_PREC)
        for n0 in range(tl.maximum(full_end, lo), hi, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
                stride_kb, stride_kt, offs_d, d_mask, hi, q_pos, qk_scale,
                BLOCK_SIZE, BLOCK_N, True, DOT_PREC)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_mask = m_mask[:, None] & d_mask[None, :]
        if ONE_SPLIT:
            tl.store(out_ptr + row_q[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.store(part_out_ptr + row_q[:, None] * stride_pt + heads[:, None] * stride_ph
                     + split * stride_ps + offs_d[None, :], out, mask=o_mask)
            tl.store(part_lse_ptr + row_q * stride_lt + heads * stride_lh + split, m_i + tl.log2(l_i),
                     mask=m_mask)
    else:
        # an empty slice (past the tile's keys) adds nothing: its weight, exp2(-inf), is all the
        # merge reads (ONE_SPLIT never gets here: every tile has a key, its own first token)
        if not ONE_SPLIT:
            tl.store(part_lse_ptr + row_q * stride_lt + heads * stride_lh + split, float("-inf"),
                     mask=m_mask)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    tile_starts_ptr, tile_seq_ptr, out_ptr, part_out_ptr, part_lse_ptr, num_seqs, num_splits,
    qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    kv_head = tl.program_id(0)
    num_tiles = tl.load(tile_starts_ptr + num_seqs)
    if ONE_SPLIT:
        # one program per tile slot; slots past the last tile (the grid is a bound, fixed when a
        # CUDA graph is captured) do nothing
        flat = tl.program_id(1)
        if flat < num_tiles:
            _prefill_tile(
                flat, 0, kv_head, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                query_start_loc_ptr, tile_starts_ptr, tile_seq_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                num_splits, qk_scale,
                stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
                stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                GROUP, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_M, BLOCK_N, ONE_SPLIT, DOT_PREC)
    else:
        # split keys: a fixed number of programs walks the (tile, split) items that exist. A grid
        # of every tile slot times every split was mostly empty programs, and launching those
        # cost more than the work (tile slot bound x 32 splits x 8 kv heads: 1.9 ms a 128-token
        # prompt on an H100)
        for item in range(tl.program_id(1), num_tiles * num_splits, tl.num_programs(1)):
            _prefill_tile(
                item // num_splits, item % num_splits, kv_head, q_ptr, k_cache_ptr, v_cache_ptr,
                block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tile_starts_ptr, tile_seq_ptr, out_ptr,
                part_out_ptr, part_lse_ptr, num_splits, qk_scale,
                stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
                stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                GROUP, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_M, BLOCK_N, ONE_SPLIT, DOT_PREC)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key, value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; slot -1 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert key.stride(2) == 1 and value.stride(2) == 1 and k_cache.stride(3) == 1
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2], num_warps=4)


def _split_partials(out: torch.Tensor, num_splits: int):
    """(part_out [rows, H, splits, D], part_lse [rows, H, splits], their strides) in float32 for
    the split kernels and their merge; with one split, placeholders the kernels never touch."""
    if num_splits == 1:
        return out, out, (0, 0, 0, 0, 0)
    rows, num_heads, head_dim = out.shape
    part_out = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=out.device)
    part_lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=out.device)
    return part_out, part_lse, (part_out.stride(0), part_out.stride(1), part_out.stride(2),
                                part_lse.stride(0), part_lse.stride(1))


def _merge_splits_into(out, part_out, part_lse, part_strides, num_splits: int,
                       num_rows: torch.Tensor | None = None) -> None:
    """out[row, head] from its splits' partials; num_rows (a 1-element device tensor) leaves the
    rows from it on unwritten (a CUDA graph's padding tokens, which no split wrote)."""
    rows, num_heads, head_dim = out.shape
    pdl = use_pdl(out)
    _reduce_splits_kernel[(rows, num_heads)](
        part_out, part_lse, out, num_splits, num_rows if num_rows is not None else part_lse, *part_strides,
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_S=triton.next_power_of_2(num_splits), ROW_LIMIT=num_rows is not None, USE_PDL=pdl, num_warps=4,
        **launch_options(pdl))


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
) -> torch.Tensor:
    """Split-KV decode: the splits' partial outputs are merged by a second kernel.

    order: the sequence each row of programs takes. With mixed context lengths and more programs
    than the SMs hold at once, programs in batch order can leave one long context running alone
    at the end; longest first, the shortest run last (the outputs are the same either way).

    fused_merge (off by default): the last split of each (seq, kv head) merges instead, saving
    the second launch; it needs counters, int32 [>= S * Hkv], zero on entry and left zero on
    exit (torch.zeros per call when not given). Its merge walks the splits one by one, so it
    won 0.3 us at <= 4 splits and lost 1-25 us at >= 5 on an H200 (docs/notes-attention.md)."""
    num_seqs, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    block_d = triton.next_power_of_2(head_dim)
    one_split = num_splits == 1
    part_out, part_lse, part_strides = _split_partials(out, num_splits)
    fused_merge = fused_merge and not one_split
    if fused_merge and counters is None:
        counters = torch.zeros(num_seqs * num_kv_heads, dtype=torch.int32, device=query.device)
    elif not fused_merge:
        counters = seq_lens  # unused
    pdl = use_pdl(query)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, order if order is not None else seq_lens,
        out, part_out, part_lse, counters,
        scale * LOG2E, num_splits,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *part_strides,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, ONE_SPLIT=one_split,
        FUSED_MERGE=fused_merge, BLOCK_S=triton.next_power_of_2(num_splits),
        DOT_PREC=_dot_precision(query.dtype), ORDERED=order is not None, USE_PDL=pdl, num_warps=num_warps,
        num_stages=num_stages, **launch_options(pdl))
    if not one_split and not fused_merge:
        _merge_splits_into(out, part_out, part_lse, part_strides, num_splits)
    return out


def prefill_tokens_per_tile(group: int, block_m: int = 128) -> int:
    """Query tokens in one prefill tile: BLOCK_M rows hold (token, query head of the group) pairs."""
    return max(block_m, triton.next_power_of_2(group) * 16) // group


def prefill_tile_map(query_start_loc: torch.Tensor, num_tokens: int, tokens_per_tile: int):
    """Every sequence's query tiles numbered in sequence order, on the device, without a sync.

    Returns tile_starts [S + 1] int32 (the first tile of each sequence; the last entry is the
    tile count) and tile_seq [bound] int32 (the sequence of each tile). The bound,
    ceil(T / tokens_per_tile) + min(S, T) (only a sequence with a query token owns a tile, and
    at most one of its tiles is partial), depends only on shapes, so a CUDA graph can capture
    it; tiles past the count are empty programs. A tight bound matters: with S in it, a 16-token
    graph for 256 sequences launched 257 tile slots for every kv head and split, 3.9 ms a
    prefix-cache hit on an H100.
    """
    num_seqs = query_start_loc.shape[0] - 1
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    tiles = torch.div(q_lens + (tokens_per_tile - 1), tokens_per_tile, rounding_mode="floor")
    tile_starts = torch.zeros(num_seqs + 1, dtype=torch.int32, device=query_start_loc.device)
    tile_starts[1:] = torch.cumsum(tiles, 0, dtype=torch.int32)
    bound = -(-num_tokens // tokens_per_tile) + min(num_seqs, num_tokens)
    flat = torch.arange(bound, dtype=torch.int32, device=query_start_loc.device)
    # the last sequence whose first tile is <= flat (sequences with no query own no tile)
    tile_seq = torch.searchsorted(tile_starts[1:], flat, right=True).to(torch.int32)
    return tile_starts, tile_seq.clamp_(max=max(num_seqs - 1, 0))


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    scale: float,
    out: torch.Tensor | None = None,
    tile_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_splits: int = 1,
    split_programs: int | None = None,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Varlen prefill over the cache. Grid (kv head, query tile, split): one program per tile that
    exists, however the tokens are spread over the sequences, so the grid stays small when a CUDA
    graph pads a step to many sequences. tile_map: prefill_tile_map() of this step, shared by the
    layers (computed here when not given).

    num_splits > 1 splits each tile's keys into that many slices, merged by a second kernel as the
    decode splits are: a step of few query tiles over a long context (a prefix-cache hit, a
    chunk's tail) otherwise runs on a handful of SMs. Slices past a tile's keys cost one store.
    split_programs: programs per kv head that walk the (tile, split) items when splitting (default:
    one per item of the bound)."""
    num_tokens, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    block_m = max(block_m, triton.next_power_of_2(group) * 16)
    tile_starts, tile_seq = tile_map if tile_map is not None else prefill_tile_map(
        query_start_loc, num_tokens, prefill_tokens_per_tile(group, block_m))
    num_seqs = seq_lens.shape[0]
    one_split = num_splits == 1
    part_out, part_lse, part_strides = _split_partials(out, num_splits)
    slots = tile_seq.shape[0]
    programs = slots if one_split else min(slots * num_splits, split_programs or slots * num_splits)
    _prefill_kernel[(num_kv_heads, programs)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_starts, tile_seq, out,
        part_out, part_lse, num_seqs, num_splits, scale * LOG2E,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *part_strides,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, ONE_SPLIT=one_split,
        DOT_PREC=_dot_precision(query.dtype), num_warps=num_warps, num_stages=num_stages)
    if not one_split:
        # tokens past query_start_loc[S] are padding; the merge leaves their rows unwritten
        _merge_splits_into(out, part_out, part_lse, part_strides, num_splits, query_start_loc[num_seqs:])
    return out
