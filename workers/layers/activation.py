import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.rmsnorm import fused_ops_for


class SiluAndMul(nn.Module):
    """silu(gate) * up on a packed [..., 2 * I] input whose first half is the gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
        ops = fused_ops_for(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
