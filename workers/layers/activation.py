import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up on a packed [..., 2 * I] input whose first half is the gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
