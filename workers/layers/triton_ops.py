"""Fused Triton kernels for a decoder layer's small ops: residual add + RMSNorm, q/k norm + RoPE, SiLU-mul.

Each replaces 5-20 torch kernels with one, and reproduces the torch path's rounding order: the
same values are rounded to the model dtype at the same points (the residual sum, the normalised
activations before the weight multiply, the weight product, silu before the up multiply, the
rotated q/k). What can still differ is the float32 sum of squares (another reduction order) and
rsqrt, about 1e-7 relative, which moves a low-precision result by at most an ulp now and then.
Launches pass enable_fp_fusion=False so that a*b - c*d is not contracted into an FMA (torch
rounds each product), exp is libdevice's expf (torch's), and divisions are IEEE (div_rn).

CUDA graphs: no host sync, outputs allocated by shape only, grids depend only on shapes.
CPU tensors are accepted too, for Triton's interpreter (TRITON_INTERPRET=1) in tests.
"""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from workers.layers.pdl import launch_options, pdl_enter, use_pdl

NO_FMA = dict(enable_fp_fusion=False)
# Triton's interpreter has no libdevice: numpy's exp stands in for expf there.
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def silu_mul(gate, up, dtype):
    """F.silu(gate) * up (both float32 in): x / (1 + expf(-x)) in float32 rounded to dtype, then the
    product rounded again."""
    if _LIBDEVICE:
        exp_neg = libdevice.exp(-gate)
    else:
        exp_neg = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + exp_neg).to(dtype)
    return (silu.to(tl.float32) * up).to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the sum is rounded to the model dtype first, as the torch add does
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) * (1.0 / N)  # torch's mean multiplies by 1/N
    normed = (h * tl.math.rsqrt(mean_sq + eps)).to(dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _norm_rope_heads(
    x_ptr, stride_h, weight_ptr, out_ptr, cos, sin, eps,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """All heads of one token: [heads, D] as two [heads, D/2] halves; out is [heads, D] contiguous."""
    HALF: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (d[None, :] < HALF)
    dtype = out_ptr.dtype.element_ty
    ptrs = x_ptr + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * (1.0 / HEAD_DIM)
    rstd = tl.math.rsqrt(mean_sq + eps)[:, None]
    w1 = tl.load(weight_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    # RMSNorm exactly as the torch path rounds it, then RoPE in float32 on the rounded values
    n1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + heads[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptrs, (n1 * cos - n2 * sin).to(dtype), mask=mask)
    tl.store(out_ptrs + HALF, (n2 * cos + n1 * sin).to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, q_out_ptr, k_out_ptr, cos_sin_ptr, positions_ptr,
    v_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, TO_CACHE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    KV_ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    d = tl.arange(0, BLOCK_HALF)
    # positions, the slots and the cos/sin table are step inputs, never written by the kernel
    # before (the qkv GEMM): read before the PDL wait, their two dependent loads overlap it
    cache_row = cos_sin_ptr + tl.load(positions_ptr + t).to(tl.int64) * stride_cache
    cos = tl.load(cache_row + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    if TO_CACHE:
        slot = tl.load(slot_mapping_ptr + t)
    pdl_enter(USE_PDL)
    _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, q_weight_ptr,
                     q_out_ptr + t * (NUM_Q_HEADS * HEAD_DIM), cos, sin, eps,
                     NUM_Q_HEADS, HEAD_DIM, BLOCK_HQ, BLOCK_HALF)
    if TO_CACHE:
        # k goes straight to its cache slot (k_out is the key cache, rows of Hkv x D), v is copied
        # beside it: what reshape_and_cache would write, without the second kernel
        if slot >= 0:  # -1: a CUDA-graph padding token, written nowhere
            _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, k_weight_ptr, k_out_ptr + slot * KV_ROW,
                             cos, sin, eps, NUM_KV_HEADS, HEAD_DIM, BLOCK_HKV, BLOCK_HALF)
            heads = tl.arange(0, BLOCK_HKV)
            full = tl.arange(0, 2 * BLOCK_HALF)
            mask = (heads[:, None] < NUM_KV_HEADS) & (full[None, :] < HEAD_DIM)
            v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + full[None, :], mask=mask)
            tl.store(v_cache_ptr + slot * KV_ROW + heads[:, None] * HEAD_DIM + full[None, :], v, mask=mask)
    else:
        _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, k_weight_ptr, k_out_ptr + t * KV_ROW,
                         cos, sin, eps, NUM_KV_HEADS, HEAD_DIM, BLOCK_HKV, BLOCK_HALF)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, I, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., N] as [R, N] with unit stride along N (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[0] == 0 else x2.contiguous()


def _norm_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def _output(out: torch.Tensor | None, shape, like: torch.Tensor) -> torch.Tensor:
    """A new contiguous output, or the caller's (tests poison it; CUDA graphs may pin one)."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    assert out.shape == shape and out.dtype == like.dtype and out.is_contiguous(), (out.shape, shape)
    return out


def _launch_rms_norm(x, residual, weight, eps, out, residual_out):
    n = x.shape[-1]
    x2 = _rows(x)
    out = _output(out, x.shape, x)
    residual_out = _output(residual_out, x.shape, x) if residual is not None else None
    if x2.shape[0] > 0:
        r2 = _rows(residual) if residual is not None else x2
        block, pdl = triton.next_power_of_2(n), use_pdl(x2)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, residual_out if residual is not None else out,
            x2.stride(0), r2.stride(0), eps,
            N=n, BLOCK=block, HAS_RESIDUAL=residual is not None, USE_PDL=pdl, num_warps=_norm_warps(block),
            **NO_FMA, **launch_options(pdl))
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., N] (rows of any stride), weight [N] of x's dtype -> RMSNorm(x) [..., N], contiguous."""
    assert weight.dtype == x.dtype and weight.shape == x.shape[-1:], (weight.shape, weight.dtype)
    return _launch_rms_norm(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] -> (RMSNorm(x + residual), x + residual), both contiguous; inputs untouched."""
    assert residual.shape == x.shape and residual.dtype == x.dtype == weight.dtype
    return _launch_rms_norm(x, residual, weight, eps, out, residual_out)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with unit stride along D (q/k split from qkv are views with a wide token stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, cos_sin_cache: torch.Tensor,
                 positions: torch.Tensor, q_out: torch.Tensor | None = None,
                 k_out: torch.Tensor | None = None, kv_write=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head RMSNorm then neox RoPE. q [T, Hq, D], k [T, Hkv, D] (any token/head strides),
    weights [D], cos_sin_cache [max_pos, D] (cos | sin), positions [T] -> new contiguous q, k.

    kv_write = (v [T, Hkv, D], kv_cache [2, num_blocks, block_size, Hkv, D], slot_mapping [T]):
    k and v go straight into the cache, as reshape_and_cache would put them (slot -1: nowhere),
    and the k returned is None: one kernel a layer instead of two."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and head_dim % 2 == 0
    assert q.dtype == k.dtype == q_weight.dtype == k_weight.dtype
    assert cos_sin_cache.shape[-1] == head_dim and cos_sin_cache.stride(-1) == 1
    q, k = _heads(q), _heads(k)
    q_out = _output(q_out, q.shape, q)
    if kv_write is not None:
        v, kv_cache, slot_mapping = kv_write
        v = _heads(v)
        assert v.shape == k.shape and kv_cache.dtype == k.dtype and kv_cache.is_contiguous()
        assert kv_cache.shape[-2:] == (num_kv_heads, head_dim)
        k_out, v_cache = kv_cache[0], kv_cache[1]
    else:
        k_out = _output(k_out, k.shape, k)
        v, v_cache, slot_mapping = k, k_out, positions  # unused
    if num_tokens > 0:
        block_hq, block_hkv = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_kv_heads)
        block_half, pdl = triton.next_power_of_2(head_dim // 2), use_pdl(q)
        _qk_norm_rope_kernel[(num_tokens,)](
            q, k, q_weight, k_weight, q_out, k_out, cos_sin_cache, positions.contiguous(),
            v, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos_sin_cache.stride(0), eps,
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, TO_CACHE=kv_write is not None,
            USE_PDL=pdl, num_warps=_norm_warps(block_hq * block_half), **NO_FMA, **launch_options(pdl))
    return q_out, (None if kv_write is not None else k_out)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] (gate | up; rows of any stride) -> silu(gate) * up [..., I], contiguous."""
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = _output(out, (*x.shape[:-1], inter), x)
    if x2.shape[0] > 0 and inter > 0:
        block, pdl = min(1024, triton.next_power_of_2(inter)), use_pdl(x2)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), inter, BLOCK=block, USE_PDL=pdl, num_warps=4, **NO_FMA,
            **launch_options(pdl))
    return out
