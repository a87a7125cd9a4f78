"""Paged varlen prefill attention in Triton (cache layout and shared pieces: triton_common.py).

- paged_prefill_attention: varlen flash attention. Grid (kv_head, query tile of any sequence); a
  tile packs BLOCK_M // group query tokens times the group's heads as its rows, so K/V are read
  once per kv head. Queries attend to the cached prefix and causally to themselves, all read from
  the cache. Few tiles over a long context split the keys instead: a fixed number of programs per
  kv head walks the (tile, key slice) items, merged as the decode splits are.
- prefill_tile_map / prefill_tokens_per_tile: the query tiles of a step, numbered on the device.
"""
import torch
import triton
import triton.language as tl

from workers.attention.triton_common import (
    LOG2E, NEG_INIT, attend_tile, attention_operands, dot_precision, merge_splits_into, split_partials)
from workers.layers.pdl import launch_options, pdl_enter, use_pdl


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
            acc, l_i, m_i = attend_tile(
                q, acc, l_i, m_i, n0, bt_row, k_cache_ptr, v_cache_ptr, kv_head_off,
                stride_kb, stride_kt, offs_d, d_mask, hi, q_pos, qk_scale,
                BLOCK_SIZE, BLOCK_N, False, DOT_PREC)
        for n0 in range(tl.maximum(full_end, lo), hi, BLOCK_N):
            acc, l_i, m_i = attend_tile(
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
    USE_PDL: tl.constexpr,
):
    kv_head = tl.program_id(0)
    # the tile map is made once per forward by torch kernels before the first layer's attention
    # (without PDL, so complete before this one starts): read it before the wait
    num_tiles = tl.load(tile_starts_ptr + num_seqs)
    pdl_enter(USE_PDL)
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
    num_tokens, _, head_dim = query.shape
    k_cache, v_cache, num_kv_heads, group, out = attention_operands(query, kv_cache, out)
    block_m = max(block_m, triton.next_power_of_2(group) * 16)
    tile_starts, tile_seq = tile_map if tile_map is not None else prefill_tile_map(
        query_start_loc, num_tokens, prefill_tokens_per_tile(group, block_m))
    num_seqs = seq_lens.shape[0]
    one_split = num_splits == 1
    part_out, part_lse, part_strides = split_partials(out, num_splits)
    slots = tile_seq.shape[0]
    programs = slots if one_split else min(slots * num_splits, split_programs or slots * num_splits)
    pdl = use_pdl(query)
    _prefill_kernel[(num_kv_heads, programs)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_starts, tile_seq, out,
        part_out, part_lse, num_seqs, num_splits, scale * LOG2E,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *part_strides,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, ONE_SPLIT=one_split,
        DOT_PREC=dot_precision(query.dtype), USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages,
        **launch_options(pdl))
    if not one_split:
        # tokens past query_start_loc[S] are padding; the merge leaves their rows unwritten
        merge_splits_into(out, part_out, part_lse, part_strides, num_splits, query_start_loc[num_seqs:])
    return out
