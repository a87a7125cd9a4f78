"""x @ W.T for a few rows (batch-1..16 decode steps, small prefix-cache hits) in one Triton kernel.

At these row counts a linear layer only streams its weight, and what a kernel costs in a CUDA
graph is mostly fixed: Qwen3-0.6B's four projections read 31.5 MB a layer (~10.5 us at an H100's
copy bandwidth) and took cuBLAS 27.3 us at one row; this kernel takes 25.1, and the lm_head 107
us against 117 (H100, cluster/benchmarks/skinny_gemm_bench.py: each shape in a graph of 28
calls). Each program owns BLOCK_N output features and walks its slice of K, so every weight
element is read once; the few x rows come from L2.

Split-K: a narrow output (1024 features: 64 programs of 16) leaves most of an H100's 132 SMs
idle, so its K is cut into split_k slices, one program each. Every slice stores its float32
partial sums, and the last slice of a column block to finish (a ticket from an atomic counter)
adds them up in slice order and writes the output. The sum's order is therefore fixed: the result
depends on the shape, never on timing or on the number of rows. The counters are left at zero
for the next call; one set per device serves every call, as one stream runs them in turn.

gated: the packed [gate | up] weight of an MLP (2I rows), out = silu(x @ gate.T) * (x @ up.T)
[M, I]. Each program owns BLOCK_N gate features and the matching up features, and its epilogue
rounds both products to the model dtype and applies silu-mul as the separate kernel does
(triton_ops.silu_mul), so the result is bitwise the unfused one and a launch is saved.

CUDA graphs: no host sync; the grid depends only on the shape. CPU tensors run under
TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from workers.layers.triton_ops import silu_mul

MAX_ROWS = 16  # tl.dot's smallest M; more rows than this go to cuBLAS
_MAX_COLUMN_BLOCKS = 4096  # counters per device: column blocks of a split output (N / BLOCK_N)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, counters_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GATED: tl.constexpr,
):
    # N is the output width: for GATED, I, with the up rows at w_ptr + N * stride_wn
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    up_rows = w_rows + N.to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_len = K // SPLIT_K  # the host splits only a K of whole BLOCK_K slices
    k_first = tl.program_id(1) * k_len
    for k0 in range(k_first, k_first + k_len, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            x_mask, w_mask = m_mask[:, None], n_mask[:, None]
        else:
            k_mask = k < K
            x_mask, w_mask = m_mask[:, None] & k_mask[None, :], n_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)), acc)
        if GATED:
            acc_up = tl.dot(x, tl.trans(tl.load(up_rows + k[None, :], mask=w_mask, other=0.0)), acc_up)
    if SPLIT_K > 1:
        # partials [SPLIT_K, 2, BLOCK_M, N] (the 2: gate and up); padded rows are zeros, stored too
        tile = offs_m[:, None] * N + offs_n[None, :]
        mine = part_ptr + tl.program_id(1) * 2 * BLOCK_M * N + tile
        tl.store(mine, acc, mask=n_mask[None, :])
        if GATED:
            tl.store(mine + BLOCK_M * N, acc_up, mask=n_mask[None, :])
        counter = counters_ptr + tl.program_id(0)
        tl.debug_barrier()  # every thread's partial stores come before the release
        ticket = tl.atomic_add(counter, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last slice in: sum all of them in slice order
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                theirs = part_ptr + s * 2 * BLOCK_M * N + tile
                acc += tl.load(theirs, mask=n_mask[None, :], other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(theirs + BLOCK_M * N, mask=n_mask[None, :], other=0.0, cache_modifier=".cg")
            tl.store(counter, 0)
            _store(out_ptr, acc, acc_up, offs_m, offs_n, m_mask, n_mask, stride_om, GATED)
    else:
        _store(out_ptr, acc, acc_up, offs_m, offs_n, m_mask, n_mask, stride_om, GATED)


@triton.jit
def _store(out_ptr, acc, acc_up, offs_m, offs_n, m_mask, n_mask, stride_om, GATED: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    if GATED:  # each product rounded to dtype first, as the unfused GEMM writes them
        out = silu_mul(acc.to(dtype).to(tl.float32), acc_up.to(dtype).to(tl.float32), dtype)
    else:
        out = acc.to(dtype)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages): best or within 2% of best for all five Qwen3-0.6B
# shapes (qkv, o, gate_up, down, lm_head) at 1 and 16 rows on an H100 (skinny_gemm_bench
# --sweep). Narrow column blocks give even a 1024-wide output 64 programs, each with five K
# slices in flight.
_BLOCK_N, _BLOCK_K, _NUM_WARPS, _NUM_STAGES = 16, 256, 2, 5
_counters: dict[torch.device, torch.Tensor] = {}


def default_split_k(column_blocks: int, k: int, block_k: int) -> int:
    """Slices of K for an output of column_blocks programs: 1 unless they would leave SMs idle."""
    return 1


def _device_counters(device: torch.device) -> torch.Tensor:
    # made by the first call (an eager warm-up, before any graph capture) and zero ever after
    if device not in _counters:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "the split-K counters must exist before a CUDA graph capture: run the model once first"
        _counters[device] = torch.zeros(_MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)
    return _counters[device]


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, gated: bool = False,
                block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit stride along K), weight [N, K] contiguous -> x @ weight.T [M, N],
    or with gated, silu(x @ weight[:N/2].T) * (x @ weight[N/2:].T) [M, N/2].
    The block and launch arguments override the tuned defaults (skinny_gemm_bench --sweep)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.dtype == weight.dtype, (x.shape, weight.shape)
    assert x.stride(-1) == 1 and weight.is_contiguous() and not (gated and weight.shape[0] % 2)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bn, bk = block_n or _BLOCK_N, block_k or _BLOCK_K
    column_blocks = triton.cdiv(n, bn)
    splits = split_k or default_split_k(column_blocks, k, bk)
    if k % (splits * bk) or column_blocks > _MAX_COLUMN_BLOCKS:
        splits = 1  # only whole BLOCK_K slices are split
    if splits > 1:
        part = torch.empty(splits, 2, MAX_ROWS, n, dtype=torch.float32, device=x.device)
        counters = _device_counters(x.device)
    else:
        part = counters = out  # unused
    _skinny_gemm_kernel[(column_blocks, splits)](
        x, weight, out, part, counters, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, SPLIT_K=splits, GATED=gated,
        num_warps=num_warps or _NUM_WARPS, num_stages=num_stages or _NUM_STAGES, enable_fp_fusion=not gated)
    return out
