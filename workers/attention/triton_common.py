"""Shared pieces of the Triton kernels over the paged KV cache of workers/attention/base.py.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
Every kernel computes in float32 and folds the softmax scale into exp2 (qk_scale = scale * log2 e).

- reshape_and_cache: one program per new token; slot -1 is skipped (CUDA-graph padding).
- attend_tile: one BLOCK_N tile of keys through the block table with an online-softmax update,
  the inner step of the decode (triton_decode.py) and prefill (triton_prefill.py) kernels.
- split_partials / merge_splits_into: the float32 partials of a split-KV launch and the second
  kernel that merges them by their log-sum-exp; merge_splits is the same merge inside a kernel.
- dot_precision: tl.dot's input precision for a query dtype; attention_operands: the caches and
  output the decode and prefill launches share.
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
def attend_tile(
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
def merge_splits(part_out_ptr, part_lse_ptr, out_ptr, s, heads, h_mask, offs_d, d_mask, num_splits,
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


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def attention_operands(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None):
    """(k_cache, v_cache, num_kv_heads, group, out) for query [rows, Hq, D] over one layer's cache:
    group query heads per kv head, and out (a new [rows, Hq, D] like query when None)."""
    num_rows, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = k_cache.shape[2]
    if out is None:
        out = torch.empty(num_rows, num_heads, head_dim, dtype=query.dtype, device=query.device)
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    return k_cache, v_cache, num_kv_heads, num_heads // num_kv_heads, out


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


def split_partials(out: torch.Tensor, num_splits: int):
    """(part_out [rows, H, splits, D], part_lse [rows, H, splits], their strides) in float32 for
    the split kernels and their merge; with one split, placeholders the kernels never touch."""
    if num_splits == 1:
        return out, out, (0, 0, 0, 0, 0)
    rows, num_heads, head_dim = out.shape
    part_out = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=out.device)
    part_lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=out.device)
    return part_out, part_lse, (part_out.stride(0), part_out.stride(1), part_out.stride(2),
                                part_lse.stride(0), part_lse.stride(1))


def merge_splits_into(out, part_out, part_lse, part_strides, num_splits: int,
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
