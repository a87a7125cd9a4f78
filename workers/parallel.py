"""Tensor-parallel group: which shard this rank holds and how shards talk to each other.

One object per worker, injected into every parallel layer (never a global). With tp_size == 1 it has
no process group and every collective is the identity, so single-device code pays nothing.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator


@dataclass
class TensorParallelGroup:
    tp_rank: int = 0
    tp_size: int = 1
    group: dist.ProcessGroup | None = None  # None when tp_size == 1

    def __post_init__(self):
        assert 0 <= self.tp_rank < self.tp_size
        assert (self.group is None) == (self.tp_size == 1), "a process group iff tp_size > 1"

    @classmethod
    def single(cls) -> "TensorParallelGroup":
        return cls()

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> "TensorParallelGroup":
        """Wrap an initialised torch.distributed group (the default world group when None)."""
        group = group or dist.group.WORLD
        size = dist.get_world_size(group)
        return cls(dist.get_rank(group), size, group if size > 1 else None)

    @classmethod
    def init(cls, tp_rank: int, tp_size: int, init_method: str, backend: str | None = None) -> "TensorParallelGroup":
        """Join (or create) the default process group of tp_size ranks; nccl on CUDA, gloo otherwise."""
        if tp_size == 1:
            return cls.single()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, world_size=tp_size, rank=tp_rank)
        return cls.from_group(dist.group.WORLD)

    @property
    def is_first_rank(self) -> bool:
        return self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim, in rank order."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)
