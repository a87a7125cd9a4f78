"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary rows.

The vocabulary is padded up to a multiple of tp_size; padded rows are zero and their logits are
cut off after the gather, so callers always see exactly num_embeddings columns.
"""
import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.linear import linear
from workers.parallel import TensorParallelGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, parallel: TensorParallelGroup):
        super().__init__()
        self.parallel = parallel
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // parallel.tp_size)
        self.vocab_start = parallel.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids outside this rank's slice look up row 0 and are zeroed; the all-reduce fills them in.
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        y = F.embedding((input_ids - self.vocab_start) * in_shard, self.weight)
        return self.parallel.all_reduce(y * in_shard.unsqueeze(-1).to(y.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the full vocabulary; may share its weight with the embedding (tied)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab]
        logits = linear(hidden, self.weight)  # [N, vocab / tp]
        if self.parallel.tp_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[:, : self.num_embeddings]
