"""Tensor-parallel linear layers (Megatron style, as in nano-vllm).

Column parallel: each rank holds a slice of the output features; no communication.
Row parallel: each rank holds a slice of the input features and the partial sums are all-reduced.
Every parameter carries weight_loader(param, loaded_weight, shard_id) that slices the full HF tensor
for this rank and copies it in (converting dtype and device on the way).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.activation import SiluAndMul
from workers.layers.rmsnorm import fused_ops_for
from workers.parallel import TensorParallelGroup, divide

# FOLOVLLM_SKINNY_GEMM=0 keeps cuBLAS for steps of a few rows too (to compare the two)
SKINNY_GEMM_ENABLED = os.environ.get("FOLOVLLM_SKINNY_GEMM", "1") != "0"
# FOLOVLLM_FUSE_SILU_MUL=0 keeps SiLU-mul a kernel of its own after a skinny gate_up GEMM
# (MergedColumnParallelLinear.forward_silu_mul), to compare; tests flip it at run time
FUSE_SILU_MUL = os.environ.get("FOLOVLLM_FUSE_SILU_MUL", "1") != "0"
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)
SKINNY_MAX_ROWS = 16  # workers/layers/skinny_gemm.MAX_ROWS, here so that this module imports without Triton


def _takes_skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether x @ weight.T (x [T, in]) runs as the skinny Triton GEMM: at most 16 rows on CUDA."""
    return (SKINNY_GEMM_ENABLED and bias is None and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS
            and x.stride(-1) == 1 and x.dtype in _SKINNY_DTYPES and weight.is_contiguous()
            and fused_ops_for(x, weight) is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; x [T, in] of at most 16 rows on CUDA goes through the skinny Triton GEMM
    (workers/layers/skinny_gemm.py): batch-1..16 decode steps and small prefix-cache hits, where
    it took Qwen3-0.6B's layer from 27.3 to 25.1 us and its lm_head from 117 to 107 us (H100)."""
    if _takes_skinny(x, weight, bias):
        from workers.layers.skinny_gemm import skinny_gemm
        return skinny_gemm(x, weight)
    return F.linear(x, weight, bias)


_SILU_AND_MUL = SiluAndMul()


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup,
                 tp_dim: int | None, bias: bool = False):
        super().__init__()
        self.parallel = parallel
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        self.tp_dim = tp_dim  # which weight dim is sharded: 0 output, 1 input, None replicated
        # torch.empty: no init cost; weights come from a checkpoint or the dummy initialiser.
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if self.tp_dim is not None and self.tp_size > 1 and loaded_weight.dim() > self.tp_dim:
            loaded_weight = self._shard(loaded_weight, self.tp_dim, param.shape[self.tp_dim])
        param.data.copy_(loaded_weight)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup, bias: bool = False):
        super().__init__(input_size, output_size, parallel, None, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup, bias: bool = False):
        super().__init__(input_size, divide(output_size, parallel.tp_size), parallel, 0, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp]
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one matmul (gate_up_proj): shard_id indexes output_sizes."""

    def __init__(self, input_size: int, output_sizes: list[int], parallel: TensorParallelGroup, bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), parallel, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int):
        # this rank's packed layout: [shard 0 slice | shard 1 slice | ...]
        offset = divide(sum(self.output_sizes[:shard_id]), self.tp_size)
        size = divide(self.output_sizes[shard_id], self.tp_size)
        param.data.narrow(0, offset, size).copy_(self._shard(loaded_weight, 0, size))

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out / tp / 2]
        """silu(gate) * up of an MLP's gate_up (two equal outputs, gate first). A step of at most 16
        rows runs SiLU-mul in the skinny GEMM's epilogue, one kernel fewer a layer: Qwen3-0.6B's
        batch-1 decode graph took 1.044 ms against 1.068 (H100, s12-call4)."""
        assert len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]
        if FUSE_SILU_MUL and _takes_skinny(x, self.weight, self.bias):
            from workers.layers.skinny_gemm import skinny_gemm_silu_mul
            return skinny_gemm_silu_mul(x, self.weight)
        return _SILU_AND_MUL(self(x))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed in one matmul; each rank holds whole heads (shard_id "q"/"k"/"v")."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 parallel: TensorParallelGroup, bias: bool = False):
        assert total_num_kv_heads % parallel.tp_size == 0, (
            f"tp_size {parallel.tp_size} must divide num_key_value_heads {total_num_kv_heads}")
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, parallel.tp_size)  # per rank
        self.num_kv_heads = divide(total_num_kv_heads, parallel.tp_size)
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, parallel, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        param.data.narrow(0, offset, size).copy_(self._shard(loaded_weight, 0, size))


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, parallel: TensorParallelGroup, bias: bool = False):
        super().__init__(divide(input_size, parallel.tp_size), output_size, parallel, 1, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out], summed over ranks
        # The bias is added once, after the reduction, not once per rank.
        y = self.parallel.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias
