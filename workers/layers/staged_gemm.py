"""x @ W.T for a few rows with the weight in shared memory before the PDL wait and K split across
a program's warps (Hopper and later, bfloat16; Triton's Gluon dialect).

A decode step's GEMM in a CUDA graph is mostly fixed cost. In the skinny Triton GEMM
(skinny_gemm.py) each program's one or two warps walk all of K after the wait: a chain of 64
dependent mma instructions for K = 1024 (192 for Qwen3-0.6B's down), with the weight streamed
behind it. Here each program owns 16 weight rows and:
- copies its whole slice (up to 3072 columns, 96 KiB) into shared memory with cp.async before
  griddepcontrol.wait, while the kernel before it still runs, then lets the next kernel launch;
- splits K across its W warps, warp w taking every W-th 64-column chunk with its own accumulator
  (one batched mma, the batch dimension across the warps), so each warp's chain is W times shorter;
- sums the W partial products in a fixed order (the result does not depend on timing), then
  stores, or applies SiLU-mul for gate_up as triton_ops.silu_and_mul rounds it.

Qwen3-0.6B on an H100 (s16-call6): a layer's six kernels (norm, qkv, o, norm, gate_up + SiLU-mul,
down) 21.0 us against 25.3 with the Triton GEMM at 1 row, 22.2 against 24.2 at 4; batch-1 time per
output token 0.96 ms against 1.07. Staging alone, one warp a tile, was no faster (s16-call2); the
mma chain was what the GEMM waited on after its wait (s16-call4; docs/benchmarks.md, Sixteenth
session). skinny_gemm sends a weight here when warps_for() gives a count.
"""
import functools
import logging

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources

from workers.layers.pdl import hopper_or_later, launch_options, use_pdl
from workers.layers.triton_ops import NO_FMA

logger = logging.getLogger(__name__)

# Gluon is experimental: Triton 3.9 renamed the copy that 3.6 (the GPU machines') calls
# async_copy_global_to_shared, and keeps the old name only to raise
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

MAX_ROWS = 16  # x rows: the mma's N side, 8 or 16 wide
ROWS_PER_PROGRAM = 16  # weight rows: one mma M side
CHUNK = 64  # K columns a chunk: a 128-byte row of bf16, 16-byte copies
# A program's weight slice in shared memory: the slices of two kernels' programs (the one running,
# the next one copying beside it) must fit an SM's 227 KiB
SMEM_PER_PROGRAM = 96 * 1024
# Eight warps for grids of at most half the SMs (Qwen3-0.6B's o and down: 64 programs), four
# otherwise. In chains of one shape eight were fastest for o and down (3.4 and 4.2 us against 4.9
# and 6.2 for the Triton GEMM, H100, 1 row), four for qkv and gate_up; eight on every GEMM made the
# layer 10% slower than the Triton GEMM, its larger grids no longer fitting beside the next kernel
# (s16-call5)
_WARPS_FEW_PROGRAMS, _WARPS = 8, 4
# More programs than this a SM (an lm_head: 9,496 at 0.6B) would stream the weight through shared
# memory in waves; skinny_gemm's kernel keeps those
_MAX_PROGRAMS_PER_SM = 4


@gluon.jit
def _pdl_wait_then_release(USE_PDL: gl.constexpr):
    if USE_PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _pow2_floor(n):
    return 1 << (int(n).bit_length() - 1)


@gluon.jit
def _copy_chunks(smem, w_rows_ptr, n_ok, START: gl.constexpr, COUNT: gl.constexpr, copy_l: gl.constexpr):
    """Chunks START..START+COUNT of the program's weight rows into smem [COUNT, 16, CHUNK], one
    copy operation (one a chunk would put a barrier between chunks)."""
    CHUNK_: gl.constexpr = smem.shape[2]
    kc = START + gl.arange(0, COUNT, layout=gl.SliceLayout(1, gl.SliceLayout(2, copy_l)))
    kk = gl.arange(0, CHUNK_, layout=gl.SliceLayout(0, gl.SliceLayout(1, copy_l)))
    ptrs = w_rows_ptr + (kc[:, None, None] * CHUNK_ + kk[None, None, :])
    mask = (kc >= 0)[:, None, None] & n_ok[None, :, None] & (kk < CHUNK_)[None, None, :]
    _async_load(smem, ptrs, mask=mask)


@gluon.jit
def _x_group(x_ptr, stride_xm, M, FIRST: gl.constexpr, CHUNK_: gl.constexpr, BLOCK_M: gl.constexpr,
             dot_b: gl.constexpr):
    """x's chunks FIRST .. FIRST + W of K, transposed as the mma's B operand: [W, CHUNK_, BLOCK_M],
    warp w holding chunk FIRST + w; rows past M read 0. K's indices come back too ([W, CHUNK_, 1])."""
    W: gl.constexpr = gl.num_warps()
    kw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, dot_b)))
    kb = gl.arange(0, CHUNK_, layout=gl.SliceLayout(0, gl.SliceLayout(2, dot_b)))
    mb = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(1, dot_b)))
    k_idx = (FIRST + kw)[:, None, None] * CHUNK_ + kb[None, :, None]
    x_t = gl.load(x_ptr + mb[None, None, :] * stride_xm + k_idx,
                  mask=(mb < M)[None, None, :] & (k_idx >= 0), other=0.0)
    return x_t, k_idx


@gluon.jit
def _row_rstd(x_ptr, stride_xm, M, eps, K: gl.constexpr, CHUNK_: gl.constexpr, BLOCK_M: gl.constexpr,
              dot_b: gl.constexpr):
    """rsqrt(mean(x * x) + eps) of each of x's BLOCK_M rows over K in float32 (RMSNorm's scale, as
    triton_ops' _rms_norm_kernel computes it), in the layout _mma_group broadcasts it in. The rows
    are read as _mma_group reads them (_x_group), so its loads of them hit L1; one reduction
    across the warps, no layout conversion."""
    W: gl.constexpr = gl.num_warps()
    squares = gl.zeros([W, CHUNK_, BLOCK_M], gl.float32, dot_b)
    for g in gl.static_range(K // (CHUNK_ * W)):
        h = _x_group(x_ptr, stride_xm, M, g * W, CHUNK_, BLOCK_M, dot_b)[0].to(gl.float32)
        squares += h * h
    mean_sq = gl.sum(gl.sum(squares, axis=1), axis=0) * (1.0 / K)  # torch's mean multiplies by 1/N
    return gl.rsqrt(mean_sq + eps)


@gluon.jit
def _mma_group(smem, x_ptr, stride_xm, M, FIRST: gl.constexpr, g: gl.constexpr, acc,
               BLOCK_M: gl.constexpr, dot_a: gl.constexpr, dot_b: gl.constexpr,
               norm_w_ptr, rstd, NORM: gl.constexpr):
    """acc += the chunks FIRST + g*W .. + W of K, warp w taking chunk FIRST + g*W + w. With NORM,
    x's rows are RMS-normalised first: rounded to x's dtype after the rstd scale and again after
    the weight's, as the norm kernel writes them."""
    W: gl.constexpr = gl.num_warps()
    x_t, k_idx = _x_group(x_ptr, stride_xm, M, FIRST + g * W, smem.shape[2], BLOCK_M, dot_b)
    if NORM:
        dtype: gl.constexpr = x_t.dtype
        normed = (x_t.to(gl.float32) * rstd[None, None, :]).to(dtype)
        w = gl.load(norm_w_ptr + k_idx).to(gl.float32)
        x_t = (w * normed.to(gl.float32)).to(dtype)
    return mma_v2(smem.slice(g * W, W, dim=0).load(dot_a), x_t, acc)


@gluon.jit
def _staged_gemm_kernel(
    x_ptr, w_ptr, out_ptr, norm_w_ptr, res_ptr, M, N, stride_xm, stride_wn, stride_om, stride_rm, eps,
    K: gl.constexpr, BLOCK_M: gl.constexpr, CHUNK_: gl.constexpr, SILU_MUL: gl.constexpr,
    NORM: gl.constexpr, RESIDUAL: gl.constexpr, USE_PDL: gl.constexpr,
):
    """out = x @ w.T over 16 weight rows a program; with SILU_MUL, w is [gate (N rows) | up (N
    rows)], a program's rows are 8 gate rows and the same 8 up rows, out = silu(x @ gate.T) * (x @ up.T).
    NORM: x is RMS-normalised with norm_w and eps first, every program computing its rows' scale
    (a [16, K] read from L2) instead of a norm kernel before it. RESIDUAL: out = the product
    rounded, plus res (out may be res: a program reads and writes only its own columns)."""
    ROWS: gl.constexpr = 16
    HALF: gl.constexpr = 8
    W: gl.constexpr = gl.num_warps()
    NUM_K: gl.constexpr = K // CHUNK_
    # shared buffers take power-of-two shapes: the chunks as a head and a tail (warps_for checks both
    # are powers of two that W divides)
    HEAD: gl.constexpr = _pow2_floor(NUM_K)
    TAIL: gl.constexpr = NUM_K - HEAD
    copy_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 4, 8], [W, 1, 1], [2, 1, 0])
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1],
                                                    instr_shape=[1, 16, 8])
    dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_l, k_width=8)
    dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_l, k_width=8)
    smem_l: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, order=[2, 1, 0])

    j = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, copy_l)))
    if SILU_MUL:
        cols = gl.program_id(0) * HALF + j % HALF
        w_rows = cols + (j // HALF) * N
        n_ok = cols < N
    else:
        w_rows = gl.program_id(0) * ROWS + j
        n_ok = w_rows < N
    w_rows_ptr = w_ptr + w_rows.to(gl.int64)[None, :, None] * stride_wn
    # the weight is the step's input-independent part: all of it in flight before the wait
    head = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [HEAD, ROWS, CHUNK_], smem_l)
    _copy_chunks(head, w_rows_ptr, n_ok, 0, HEAD, copy_l)
    if TAIL > 0:
        tail = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [TAIL, ROWS, CHUNK_], smem_l)
        _copy_chunks(tail, w_rows_ptr, n_ok, HEAD, TAIL, copy_l)
    async_copy.commit_group()
    _pdl_wait_then_release(USE_PDL)
    async_copy.wait_group(0)

    dtype: gl.constexpr = out_ptr.dtype.element_ty
    out_l: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_M, BLOCK_M], [W, 1], [1, 0])
    out_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
    if SILU_MUL:
        out_cols = gl.program_id(0) * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_l))
    else:
        out_cols = gl.program_id(0) * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_l))
    out_mask = (out_rows < M)[None, :] & (out_cols < N)[:, None]
    if RESIDUAL:  # read now: its latency hides behind the products
        res = gl.load(res_ptr + out_rows[None, :] * stride_rm + out_cols[:, None], mask=out_mask, other=0.0)
    if NORM:
        rstd = _row_rstd(x_ptr, stride_xm, M, eps, K, CHUNK_, BLOCK_M, dot_b)
    else:
        rstd = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(0, gl.SliceLayout(1, dot_b)))
    acc = gl.zeros([W, ROWS, BLOCK_M], gl.float32, mma_l)
    for g in gl.static_range(HEAD // W):
        acc = _mma_group(head, x_ptr, stride_xm, M, 0, g, acc, BLOCK_M, dot_a, dot_b, norm_w_ptr, rstd, NORM)
    if TAIL > 0:
        for g in gl.static_range(TAIL // W):
            acc = _mma_group(tail, x_ptr, stride_xm, M, HEAD, g, acc, BLOCK_M, dot_a, dot_b, norm_w_ptr, rstd, NORM)
    total = gl.sum(acc, axis=0)  # [ROWS, BLOCK_M]: the warps' partial products

    if SILU_MUL:
        # gate and up rows meet through shared memory, each rounded to dtype first as the GEMM's
        # output would be; then SiLU-mul as triton_ops.silu_mul rounds it
        tile = gl.allocate_shared_memory(dtype, [ROWS, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]),
                                         total.to(dtype))
        gate = tile.slice(0, HALF).load(out_l).to(gl.float32)
        up = tile.slice(HALF, HALF).load(out_l).to(gl.float32)
        silu = gl.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype)
        value = (silu.to(gl.float32) * up).to(dtype)
    else:
        value = gl.convert_layout(total.to(dtype), out_l)
    if RESIDUAL:  # the decoder's residual add, rounded as the torch add rounds it
        value = (value.to(gl.float32) + res.to(gl.float32)).to(dtype)
    gl.store(out_ptr + out_rows[None, :] * stride_om + out_cols[:, None], value, mask=out_mask)


# What a launch raises when this kernel does not build (Gluon is experimental, see disable()): a
# front-end error is a CompilationError, a backend pass failing a RuntimeError
BUILD_ERRORS = (CompilationError, OutOfResources, RuntimeError)
_disabled_by: str | None = None  # why this kernel stopped being used in this process (see disable)


def disable(error: Exception) -> None:
    """Stop sending weights here for the rest of the process: a Triton release that no longer
    compiles this kernel (Gluon changes between releases) must cost speed, not requests."""
    global _disabled_by
    if _disabled_by is None:
        logger.warning("the staged GEMM (workers/layers/staged_gemm.py) failed to build with Triton %s; "
                       "skinny_gemm's Triton kernel takes its weights from now on: %r", triton.__version__, error)
    _disabled_by = repr(error)


def disabled_by() -> str | None:
    """Why disable() stopped this kernel in this process, or None while it is in use."""
    return _disabled_by


def num_sms(device: torch.device) -> int:
    """The SMs of a CUDA device (warps_for_shape's num_sms)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def warps_for_shape(weight_rows: int, k: int, silu_mul: bool, num_sms: int) -> int | None:
    """Warps a program for a [weight_rows, k] weight on a card of num_sms SMs, or None where the
    kernel does not take it: K not whole chunks, a slice over SMEM_PER_PROGRAM, a head or tail of
    chunks the warps do not divide, or more than _MAX_PROGRAMS_PER_SM programs a SM."""
    chunks = k // CHUNK
    if chunks == 0 or k % CHUNK or ROWS_PER_PROGRAM * k * 2 > SMEM_PER_PROGRAM:
        return None
    head = 1 << (chunks.bit_length() - 1)
    tail = chunks - head
    programs = triton.cdiv(weight_rows, ROWS_PER_PROGRAM)  # silu_mul: half of each gate and up
    if programs > _MAX_PROGRAMS_PER_SM * num_sms:
        return None
    warps = _WARPS_FEW_PROGRAMS if programs <= num_sms // 2 else _WARPS
    if head % warps or tail % warps or (tail & (tail - 1)):
        return None
    if silu_mul and weight_rows % 2:
        return None
    return warps


def warps_for(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False) -> int | None:
    """Warps a program for x @ weight.T here, or None where skinny_gemm's kernel keeps it: after
    disable(), not an NVIDIA Hopper-or-later GPU, not bfloat16, 0 or more than MAX_ROWS rows,
    unaligned, or a weight warps_for_shape refuses."""
    if _disabled_by is not None:
        return None
    if not (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and 0 < x.shape[0] <= MAX_ROWS
            and x.dim() == 2 and weight.is_contiguous() and x.stride(-1) == 1):
        return None
    if not (weight.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0):
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if not hopper_or_later(index):
        return None
    return warps_for_shape(weight.shape[0], weight.shape[1], silu_mul, _num_sms(index))


def staged_gemm(x: torch.Tensor, weight: torch.Tensor, warps: int, out: torch.Tensor | None = None,
                silu_mul: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T ([N, K]), or with silu_mul (weight [gate | up]) silu(x @ gate.T) * (x @ up.T);
    warps from warps_for(x, weight, silu_mul).
    norm_weight: x's rows are first RMS-normalised with it and eps (RMSNorm's rounding).
    residual [M, N]: the result plus residual; out may be residual itself (an in-place add)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    if norm:
        assert norm_weight.shape == (k,) and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
    if residual is not None:
        assert residual.shape == (m, n) and residual.dtype == x.dtype and residual.stride(1) == 1 and not silu_mul
    pdl = use_pdl(x)
    _staged_gemm_kernel[(triton.cdiv(weight.shape[0], ROWS_PER_PROGRAM),)](
        x, weight, out, norm_weight if norm else weight, residual if residual is not None else out,
        m, n, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        K=k, BLOCK_M=8 if m <= 8 else 16, CHUNK_=CHUNK, SILU_MUL=silu_mul, NORM=norm,
        RESIDUAL=residual is not None, USE_PDL=pdl,
        num_warps=warps, **(NO_FMA if silu_mul or norm else {}), **launch_options(pdl))
    return out
