"""Reference attention in plain torch over the paged KV cache: correctness first, runs anywhere.

Per layer the cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (see base.py). Each step
writes the new tokens' K/V through slot_mapping, then attends sequence by sequence over the context
gathered from the block table. Only host-side lengths are read, so there is no device sync.
"""
import torch
import torch.nn.functional as F

from workers.attention.base import AttentionMetadata


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    # key/value [N, Hkv, D] -> slots slot_mapping [N] of the flattened cache [num_blocks * block_size, Hkv, D]
    assert kv_cache.is_contiguous(), "flatten must be a view, or the writes would land in a copy"
    k_cache, v_cache = kv_cache[0].flatten(0, 1), kv_cache[1].flatten(0, 1)
    k_cache.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    # cache [num_blocks, B, Hkv, D], block_table [max_blocks] -> the first seq_len tokens [seq_len, Hkv, D]
    num_blocks = -(-seq_len // cache.shape[1])
    return cache.index_select(0, block_table[:num_blocks]).flatten(0, 1)[:seq_len]


def _written_rows(metadata: AttentionMetadata) -> slice | list[int]:
    """Rows of the step whose K/V go to the cache, from host data only. Tokens past
    query_start_loc_cpu[-1] and sequences with seq_len 0 are padding (slot_mapping -1)."""
    qsl, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    if all(seq_lens):
        return slice(0, qsl[-1])
    return [t for s, n in enumerate(seq_lens) if n > 0 for t in range(qsl[s], qsl[s + 1])]


class TorchRefBackend:
    name = "torch"
    takes_written_kv = False  # it writes the step's K/V itself, wherever the model runs

    def __init__(self, device: torch.device | str | None = None):
        pass  # stateless; device accepted for the registry's uniform constructor

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        # query [T, Hq, D], key/value [T, Hkv, D] -> [T, Hq, D]; padding rows come out zero
        rows = _written_rows(metadata)
        if isinstance(rows, list):  # rare (padded batches): a host-built index, copied without a sync
            rows = torch.tensor(rows, dtype=torch.long).to(query.device, non_blocking=True)
        write_kv_cache(key[rows], value[rows], kv_cache, metadata.slot_mapping[rows])
        out = torch.zeros_like(query)
        group = query.shape[1] // key.shape[1]  # query heads per kv head (GQA)
        for s, seq_len in enumerate(metadata.seq_lens_cpu):
            q_start, q_end = metadata.query_start_loc_cpu[s], metadata.query_start_loc_cpu[s + 1]
            if seq_len == 0 or q_end == q_start:
                continue
            k = gather_context(kv_cache[0], metadata.block_tables[s], seq_len)  # [S, Hkv, D]
            v = gather_context(kv_cache[1], metadata.block_tables[s], seq_len)
            out[q_start:q_end] = self._attend(query[q_start:q_end], k, v, scale, group)
        return out

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int) -> torch.Tensor:
        # q [Q, Hq, D] are the last Q of the S context positions; k/v [S, Hkv, D] -> [Q, Hq, D]
        num_queries, seq_len = q.shape[0], k.shape[0]
        # Query i sits at position seq_len - Q + i and sees keys 0..that position (bottom-right causal).
        mask = torch.ones(num_queries, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - num_queries)
        k, v = k.to(q.dtype).repeat_interleave(group, dim=1), v.to(q.dtype).repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)  # [Hq, Q, D]
        return o.transpose(0, 1)
