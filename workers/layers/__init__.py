from workers.layers.activation import SiluAndMul
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   ReplicatedLinear, RowParallelLinear)
from workers.layers.rmsnorm import RMSNorm
from workers.layers.rotary import RotaryEmbedding, get_rope_theta

__all__ = [
    "ColumnParallelLinear", "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RMSNorm",
    "ReplicatedLinear", "RotaryEmbedding", "RowParallelLinear", "SiluAndMul", "VocabParallelEmbedding",
    "get_rope_theta",
]
