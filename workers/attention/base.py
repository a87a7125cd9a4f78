"""The attention backend interface. Every backend reads and writes the same paged KV cache layout.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim]  (0: keys, 1: values).
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size.

A step is one flat batch of T tokens from S sequences; sequence s contributes query_lens[s]
new tokens at the end of its context of seq_lens[s] tokens (the first seq_lens[s] - query_lens[s]
are already in the cache, from earlier steps or the prefix cache).
"""
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    query_start_loc: torch.Tensor  # [S + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [S] int32: context length after this step
    block_tables: torch.Tensor  # [S, max_blocks_per_seq] int32, padded with 0
    query_start_loc_cpu: list[int]  # host copies, so backends need no device sync
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # [S] int32, sequences longest context first: set by a backend's first layer and reused by
    # the others (inside a CUDA graph too, where the sort is captured with them)
    decode_order: torch.Tensor | None = None
    # (tile_starts, tile_seq) of the prefill kernel's query tiles: the same per-forward scratch
    prefill_tile_map: tuple[torch.Tensor, torch.Tensor] | None = None
    # [S] int32, decode-only steps whose rows include one sequence's query tokens (a CUDA graph's
    # prefix-cache hit): the rows each row's program takes (workers/attention/row_groups.py)
    row_groups: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    name: str
    # True: forward accepts key None, meaning this step's K/V are in the cache already (written
    # by the fused q/k norm + RoPE kernel); the backend reads K/V from the cache only
    takes_written_kv: bool

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor | None,  # [T, num_kv_heads, head_dim]; None: written already
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write this step's K/V into the cache, then attend causally over each full context."""
        ...
