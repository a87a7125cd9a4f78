import os
from types import ModuleType

import torch
from torch import nn

# The switch for every fused op of workers/layers (rmsnorm, rotary, activation), kept here because
# this module imports without Triton. FOLOVLLM_FUSED_OPS=0 keeps the torch path on CUDA too; tests
# may flip FUSED_OPS_ENABLED at run time. TRITON_INTERPRET=1 sends CPU tensors through Triton's
# interpreter (kernel tests only); otherwise the CPU runs the torch code below, the reference.
FUSED_OPS_ENABLED = os.environ.get("FOLOVLLM_FUSED_OPS", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_ops: ModuleType | bool | None = None  # None: not tried yet; False: Triton does not import


def fused_ops_for(x: torch.Tensor, *weights: torch.Tensor) -> ModuleType | None:
    """workers.layers.triton_ops when x (with weights of its dtype) should take the fused kernels."""
    global _triton_ops
    if not FUSED_OPS_ENABLED or not (x.is_cuda or _INTERPRET) or x.dtype not in _FUSED_DTYPES:
        return None
    if any(w.dtype != x.dtype for w in weights):
        return None  # the torch path promotes mixed dtypes; the kernels do not
    if _triton_ops is None:
        try:
            from workers.layers import triton_ops
            _triton_ops = triton_ops
        except ImportError:
            _triton_ops = False
    return _triton_ops or None


class RMSNorm(nn.Module):
    """RMSNorm as HF Qwen3 computes it: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # [..., dim] -> [..., dim]
        """out: where the normed rows go (contiguous, x's shape and dtype); a new tensor when None."""
        ops = fused_ops_for(x, self.weight)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, out=out)
        normed = self.forward_torch(x)
        return normed if out is None else out.copy_(normed)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor,
                              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual): the decoder's residual add fused into the next norm.
        out: where the normed rows go (contiguous, x's shape and dtype); a new tensor when None."""
        ops = fused_ops_for(x, residual, self.weight)
        if ops is not None:
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps, out=out)
        residual = x + residual
        normed = self.forward_torch(residual)
        return (normed if out is None else out.copy_(normed)), residual
