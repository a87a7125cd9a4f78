"""A decoder layer's four projections as staged GEMMs with its two RMSNorms and residual adds folded in.

In a step of a few rows every kernel of a layer is mostly fixed cost (docs/benchmarks.md, the
fourteenth and sixteenth sessions: ~1 us a boundary, a few us of dependent loads after each wait).
The plain layer runs nine: add + norm, qkv, q/k norm + RoPE, attention and its merge, o, add +
norm, gate_up + SiLU-mul, down. The add + norm kernels sit between two GEMMs on the critical
path. Here they go:
- each qkv and gate_up program RMS-normalises the residual stream's rows itself (a [16, K] read
  from L2) before its product (staged_gemm's NORM);
- o and down add their rounded products into the residual stream in their epilogue
  (staged_gemm's RESIDUAL), in place: a program reads and writes only its own columns.
So the stream holds x + residual after every projection, and a layer is seven kernels instead of
nine. Same values as the plain layer up to the norm's float32 sum of squares (another reduction
order, as the norm kernel's own note says of torch's).

Taken only where every projection takes the staged GEMM (bfloat16, Hopper and later, at most 16
rows, shapes staged_gemm.warps_for_shape accepts) and without tensor parallelism: o and down are
all-reduced across ranks, and the residual must be added once, not once a rank.
FOLOVLLM_STAGED_NORMS=0 keeps the norm kernels (to compare).
"""
import os

import torch

STAGED_NORMS = os.environ.get("FOLOVLLM_STAGED_NORMS", "1") != "0"


def layer_warps(x: torch.Tensor, layer) -> tuple[int, int, int, int] | None:
    """Warps a program for each of the layer's qkv, o, gate_up and down staged GEMMs on the rows of
    x (the embedding's output, [T, hidden]), or None where the plain layer runs."""
    from workers.layers import linear
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not (STAGED_NORMS and linear.FUSE_SILU_MUL and attn.qkv_proj.tp_size == 1
            and all(p.bias is None for p in projections)
            and linear._takes_skinny(x, attn.qkv_proj.weight, None)):
        return None
    from workers.layers import skinny_gemm
    staged = skinny_gemm.staged_gemm
    if not skinny_gemm.STAGED or staged is None:
        return None
    qkv = staged.warps_for(x, attn.qkv_proj.weight)
    if qkv is None:  # not Hopper, not bfloat16, disabled, or a shape it refuses
        return None
    sms = staged.num_sms(x.device)
    rest = (staged.warps_for_shape(*attn.o_proj.weight.shape, False, sms),
            staged.warps_for_shape(*mlp.gate_up_proj.weight.shape, True, sms),
            staged.warps_for_shape(*mlp.down_proj.weight.shape, False, sms))
    return None if None in rest else (qkv, *rest)


def staged_linear(x: torch.Tensor, weight: torch.Tensor, warps: int, *, silu_mul: bool = False,
                  norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """staged_gemm.staged_gemm (a residual is updated in place and returned). Should the kernel
    fail to build, it is disabled for the process (staged_gemm.disable) and this call gives the
    same result from the separate kernels; the next forward takes the plain layer."""
    from workers.layers import skinny_gemm, triton_ops
    staged = skinny_gemm.staged_gemm
    if staged.disabled_by() is None:  # the forward that found it broken finishes on the separate kernels
        try:
            return staged.staged_gemm(x, weight, warps, out=residual, silu_mul=silu_mul,
                                      norm_weight=norm_weight, eps=eps, residual=residual)
        except staged.BUILD_ERRORS as error:
            staged.disable(error)
    if norm_weight is not None:
        x = triton_ops.rms_norm(x, norm_weight, eps)
    y = skinny_gemm.skinny_gemm_silu_mul(x, weight) if silu_mul else skinny_gemm.skinny_gemm(x, weight)
    # a bfloat16 add rounds the float32 sum once, as the kernel's epilogue does
    return y if residual is None else torch.add(y, residual, out=residual)
