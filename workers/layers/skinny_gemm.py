"""x @ W.T for a few rows (batch-1..16 decode steps, small prefix-cache hits) in one Triton kernel.

At these row counts a linear layer only streams its weight, and what a kernel costs in a CUDA
graph is mostly fixed: Qwen3-0.6B's four projections read 31.5 MB a layer (~10.5 us at an H100's
copy bandwidth) and took cuBLAS 27.3 us at one row; this kernel takes 25.1, and the lm_head 107
us against 117 (H100, cluster/benchmarks/skinny_gemm_bench.py: each shape in a graph of 28
calls). Each program owns BLOCK_N output features and walks all of K, so every weight element is
read once and the float32 sum runs in one fixed order (no split-K atomics: the result does not
depend on timing); the few x rows come from L2.

CUDA graphs: no host sync; the grid depends only on N. CPU tensors run under TRITON_INTERPRET=1.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from workers.layers.pdl import launch_options, pdl_release, pdl_wait, prefetch_l2, use_pdl
from workers.layers.triton_ops import NO_FMA, silu_mul

MAX_ROWS = 16  # tl.dot's smallest M; more rows than this go to cuBLAS
# Launched with PDL, a program may prefetch its weight slice into L2 before its wait. In graphs of
# one shape that won up to 1.5 us a GEMM, but in the engine's decode graphs, where norms, attention
# and other GEMMs sit between them, it cost more than it saved: Qwen3-0.6B's batch-1, 4-row and
# 8-row graphs took 1.019, 1.082 and 1.235 ms without it against 1.038, 1.106 and 1.257 with it
# (H100, s14-call7; s14-call9 again), with the same greedy ids. So it is off unless the caller
# asks; FOLOVLLM_GEMM_PREFETCH=1 brings back the size rule (_PREFETCH_L2_FRACTION), to compare.
PREFETCH_BY_SIZE = os.environ.get("FOLOVLLM_GEMM_PREFETCH", "0") == "1"
# Weights that fit (staged_gemm.warps_for: Qwen3-0.6B's four projections) go, in bfloat16 on Hopper
# and later, to staged_gemm.py: the weight in shared memory before the PDL wait, K split across
# warps. Batch-1 time per output token 0.96 ms against 1.07 here (H100, s16-call6).
# FOLOVLLM_STAGED_GEMM=0 keeps them here (to compare).
STAGED = os.environ.get("FOLOVLLM_STAGED_GEMM", "1") != "0"
try:  # Gluon, Triton's layout-level dialect: experimental, and absent from older Triton releases
    from workers.layers import staged_gemm
except ImportError:
    staged_gemm = None


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, W_BYTES: tl.constexpr, SILU_MUL: tl.constexpr,
):
    """out = x @ w.T; with SILU_MUL, w is [gate (N rows) | up (N rows)] and out = silu(x @ gate.T)
    * (x @ up.T): a program's BLOCK_N weight rows are BLOCK_N / 2 gate rows and the same up rows,
    so its epilogue has both halves of its outputs and no work is repeated across programs."""
    HALF: tl.constexpr = BLOCK_N // 2
    j = tl.arange(0, BLOCK_N)
    if SILU_MUL:
        cols = tl.program_id(0) * HALF + j % HALF  # the output column each weight row serves
        offs_n = cols + (j // HALF) * N
        n_mask = cols < N
    else:
        offs_n = tl.program_id(0) * BLOCK_N + j
        n_mask = offs_n < N
    if PREFETCH:  # the weight slice is the step's input-independent part: fetch it before the wait
        if SILU_MUL:
            first = tl.program_id(0) * HALF
            size = tl.minimum(HALF, N - first) * stride_wn * W_BYTES
            prefetch_l2(w_ptr + first.to(tl.int64) * stride_wn, size)
            prefetch_l2(w_ptr + (first + N).to(tl.int64) * stride_wn, size)
        else:
            first = tl.program_id(0) * BLOCK_N
            prefetch_l2(w_ptr + first.to(tl.int64) * stride_wn,
                        tl.minimum(BLOCK_N, N - first) * stride_wn * W_BYTES)
    pdl_wait(USE_PDL)
    # gate_up with SiLU-mul is followed by down, another GEMM: launched this early, down's programs
    # sat on the SMs beside these and prefetched its weight under this one's stream. Released after
    # the K loop, Qwen3-0.6B's batch-1 decode graph took 1.044 ms against 1.121 (H100, s12-call4)
    if not SILU_MUL:
        pdl_release(USE_PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    dtype = out_ptr.dtype.element_ty
    if SILU_MUL:
        pdl_release(USE_PDL)
        # each product rounded to dtype first, as the GEMM's output and silu_and_mul round it
        gate, up = tl.split(tl.permute(tl.reshape(acc.to(dtype), [BLOCK_M, 2, HALF]), (0, 2, 1)))
        out_cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
        tl.store(out_ptr + offs_m[:, None] * stride_om + out_cols[None, :],
                 silu_mul(gate.to(tl.float32), up.to(tl.float32), dtype),
                 mask=m_mask[:, None] & (out_cols < N)[None, :])
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(dtype),
                 mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages): best or within 2% of best for all five Qwen3-0.6B
# shapes (qkv, o, gate_up, down, lm_head) at 1 and 16 rows on an H100 (skinny_gemm_bench
# --sweep). Narrow column blocks give even a 1024-wide output 64 programs, each with five K
# slices in flight.
_BLOCK_N, _BLOCK_K, _NUM_WARPS, _NUM_STAGES = 16, 256, 2, 5
# Launched with PDL, a GEMM's programs sit on their SMs beside the previous kernel's while they
# wait; three stages (less shared memory each) then beat five: 56 chained GEMMs of the four
# shapes at 1 row took 5.32 us each against 5.71 without PDL (H100, s9-call2)
_NUM_STAGES_PDL = 3
# The size rule, under FOLOVLLM_GEMM_PREFETCH=1. The prefetch pays only while the weight stays in
# L2 until its programs read it. A weight of more than a fifth of L2, prefetched beside the kernel
# before, evicts its own lines and is read twice: at 4 rows Qwen3-8B's projections took 1.4-1.6x as
# long with it, its lm_head 667 against 411 us (H100, skinny_gemm_bench, s11-call4). In graphs of
# one shape, Qwen3-0.6B's 4-8 MiB qkv, o and down gained up to 1.5 us each from it; its 12 MiB
# gate_up and its lm_head lost a little.
_PREFETCH_L2_FRACTION = 5
# Without the prefetch a program streams its slice from HBM. Where the grid leaves at most two
# programs a SM, a fourth stage in flight pays; with more, three (four programs a SM fit in shared
# memory at three, three at four). In the sweeps of Qwen3-1.7B's, 8B's and 32B's shapes at 4 rows,
# every shape with N <= 4096 (256 programs of 16 columns) was 4-14% faster with four, every one
# with N >= 5120 within 1% or up to 10% faster with three; 0.6B's and 4B's agree across calls
# (H100, skinny_gemm_bench --sweep-large, s11-call4 and s11-call9)
_NUM_STAGES_FEW_PROGRAMS, _FEW_PROGRAMS_PER_SM = 4, 2


@functools.cache
def _card(device_index: int) -> tuple[int, int]:
    """(prefetch limit in bytes, number of SMs) of a card."""
    props = torch.cuda.get_device_properties(device_index)
    return props.L2_cache_size // _PREFETCH_L2_FRACTION, props.multi_processor_count


def _fits_l2(weight: torch.Tensor) -> bool:
    return weight.numel() * weight.element_size() <= _card(weight.device.index)[0]


def _stages(pdl: bool, prefetch: bool, num_programs: int, device_index: int) -> int:
    if not pdl:
        return _NUM_STAGES
    if prefetch or num_programs > _FEW_PROGRAMS_PER_SM * _card(device_index)[1]:
        return _NUM_STAGES_PDL
    return _NUM_STAGES_FEW_PROGRAMS


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                block_n: int | None = None, block_k: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None,
                prefetch: bool | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit stride along K), weight [N, K] contiguous -> x @ weight.T [M, N].
    The block, launch and prefetch arguments override the tuned defaults (skinny_gemm_bench --sweep)."""
    return _launch(x, weight, out, block_n=block_n, block_k=block_k, num_warps=num_warps,
                   num_stages=num_stages, prefetch=prefetch)


def skinny_gemm_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K], weight [gate | up] ([2I, K]) -> silu(x @ gate.T) * (x @ up.T) [M, I], bitwise what
    skinny_gemm then triton_ops.silu_and_mul give: the product rounded to the model dtype, then
    SiLU-mul rounded as that kernel rounds it. An MLP's gate_up and SiLU-mul in one kernel."""
    assert weight.shape[0] % 2 == 0, weight.shape
    return _launch(x, weight, None, silu_mul=True)


def _launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, silu_mul: bool = False,
            block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
            num_stages: int | None = None, prefetch: bool | None = None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]  # output columns
    assert m <= MAX_ROWS and weight.shape[1] == k and x.dtype == weight.dtype, (x.shape, weight.shape)
    assert x.stride(-1) == 1 and weight.is_contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    no_overrides = block_n is block_k is num_warps is num_stages is prefetch is None
    warps = (staged_gemm.warps_for(x, weight, silu_mul)
             if STAGED and no_overrides and staged_gemm is not None else None)
    if warps is not None:
        try:
            return staged_gemm.staged_gemm(x, weight, warps, out=out, silu_mul=silu_mul)
        except staged_gemm.BUILD_ERRORS as error:
            staged_gemm.disable(error)
    bn, bk = block_n or _BLOCK_N, block_k or _BLOCK_K
    pdl = use_pdl(x)
    if prefetch is None:  # off, or by the weight's size under FOLOVLLM_GEMM_PREFETCH=1 (CUDA only)
        prefetch = pdl and PREFETCH_BY_SIZE and _fits_l2(weight)
    # a bulk prefetch needs 16-byte aligned rows
    aligned = (k * weight.element_size()) % 16 == 0 and weight.data_ptr() % 16 == 0
    prefetch = pdl and aligned and prefetch
    num_programs = triton.cdiv(n, bn // 2 if silu_mul else bn)
    _skinny_gemm_kernel[(num_programs,)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, USE_PDL=pdl, PREFETCH=prefetch,
        W_BYTES=weight.element_size(), SILU_MUL=silu_mul, num_warps=num_warps or _NUM_WARPS,
        num_stages=num_stages or _stages(pdl, prefetch, num_programs, weight.device.index),
        # SiLU-mul rounds as triton_ops.silu_and_mul does, which needs each product rounded
        **(NO_FMA if silu_mul else {}), **launch_options(pdl))
    return out
