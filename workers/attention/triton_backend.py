"""TritonBackend: the attention backend interface on Triton kernels (CUDA only).

forward = write this step's K/V into the cache, then
  decode-only batch (max_query_len == 1) -> split-KV paged decode kernel + split merge;
  any other batch -> varlen prefill kernel over the cache (prefix, chunks and decode rows alike).

CUDA graphs (decode steps, and every other step padded to a token count). forward does no device
sync and reads only host ints from the metadata: num_seqs (len(seq_lens_cpu)), max_query_len and
max_seq_len. What one captured graph fixes:
  - the number of sequences S (pad with rows of slot_mapping -1 and seq_len 0: they write
    nothing and give zero output) and the tensors' addresses and shapes: query/key/value,
    kv_cache, slot_mapping, seq_lens, block_tables (its width too: it is a stride argument);
  - the number of KV splits, chosen from (S, metadata.max_seq_len) by num_decode_splits(), and
    for other steps from (T, metadata.max_seq_len) by num_prefill_splits();
  - longest_first: the order of the sequences, sorted on the device by the first layer.
    Capture with max_seq_len = the longest context the graph may serve (e.g. max_model_len)
    or pass fixed_decode_splits to the constructor. Replays are correct for any seq_lens: each
    split's slice is computed on the device; only the speed depends on the split count.
query_start_loc is not read on the decode path (row s is sequence s).
"""
import torch

from workers.attention.base import AttentionMetadata
from workers.attention.triton_common import reshape_and_cache
from workers.attention.triton_decode import paged_decode_attention
from workers.attention.triton_prefill import paged_prefill_attention, prefill_tile_map, prefill_tokens_per_tile


class TritonBackend:
    name = "triton"
    takes_written_kv = True  # both kernels read K/V from the cache only

    def __init__(
        self,
        device: torch.device | str | None = None,
        fixed_decode_splits: int | None = None,
        max_decode_splits: int = 64,
        max_prefill_splits: int = 32,
        max_prefill_split_rows: int = 4096,
        max_prefill_split_tokens: int = 64,
        min_split_tokens: int = 64,
        programs_per_sm: int = 4,
        longest_first: bool = True,
    ) -> None:
        device = torch.device(device if device is not None else "cuda")
        # (a CPU device only serves Triton's interpreter, TRITON_INTERPRET=1, in tests)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)
        self.fixed_decode_splits = fixed_decode_splits
        self.max_decode_splits = max_decode_splits
        self.max_prefill_splits = max_prefill_splits
        self.max_prefill_split_rows = max_prefill_split_rows
        self.max_prefill_split_tokens = max_prefill_split_tokens
        self.min_split_tokens = min_split_tokens
        self.programs_per_sm = programs_per_sm
        self.longest_first = longest_first

    def num_decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
        """Enough (seq, kv_head, split) programs for programs_per_sm on every SM, each split
        >= min_split_tokens (one 64-token tile). Tuned on an H200: docs/notes-attention.md. Two
        programs fit an SM at once; 4 per SM (two waves) lets the longest-first order balance
        mixed context lengths, as serving batches have them: 3-10% faster at batches 16-64 of
        100-2000 tokens, but 6-12% slower at batches 32-64 of one length (H200, s3 runs)."""
        if self.fixed_decode_splits is not None:
            return self.fixed_decode_splits
        wanted = -(-self.programs_per_sm * self.num_sms // max(1, num_seqs * num_kv_heads))
        by_length = -(-max_seq_len // self.min_split_tokens)
        return max(1, min(wanted, by_length, self.max_decode_splits))

    def num_prefill_splits(self, num_tokens: int, num_kv_heads: int, group: int, max_seq_len: int) -> int:
        """KV splits for a non-decode step, from host ints only (a CUDA graph captures the count).

        Split only when the step's tokens make fewer (kv head, tile) programs than there are SMs:
        a 4-token prefix-cache hit over 2k cached tokens is one tile, 8 programs on an H100's 132
        SMs. Each split's partials cost T rows of float32 writes and a merge read, so the count
        also stays under max_prefill_split_rows // T (and is 1 for any step of many tiles). The
        split kernel runs programs_per_sm programs a SM whatever the count, walking the (tile,
        slice) items that exist, so slices past a short context cost a store each.

        A graph cannot tell a long context from a short one (it is captured for max_model_len),
        and on a fresh 128-token prompt the split cost more than it saved (H100, step_profile
        --prefill 128: 2.37-2.70 ms a request against 2.12-2.18 unsplit), so steps of more than
        max_prefill_split_tokens run unsplit, as before; the 4-token prefix-cache hit (a 16-token
        graph) is where splitting pays: 71 -> 14 us a layer."""
        if num_tokens > self.max_prefill_split_tokens:
            return 1
        min_tiles = max(1, -(-num_tokens // prefill_tokens_per_tile(group)))
        programs = min_tiles * num_kv_heads
        if programs >= self.num_sms:
            return 1
        wanted = -(-self.programs_per_sm * self.num_sms // programs)
        by_length = -(-max_seq_len // self.min_split_tokens)
        by_rows = max(1, self.max_prefill_split_rows // max(1, num_tokens))
        return max(1, min(wanted, by_length, by_rows, self.max_prefill_splits))

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor | None,  # [T, num_kv_heads, head_dim]; None: already in the cache
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        if key is not None:
            reshape_and_cache(key, value, kv_cache, metadata.slot_mapping)
        if metadata.is_decode_only:
            assert query.shape[0] == metadata.num_seqs, "decode rows are one token per sequence"
            num_splits = self.num_decode_splits(metadata.num_seqs, kv_cache.shape[3],
                                                metadata.max_seq_len)
            if self.longest_first and metadata.decode_order is None:
                metadata.decode_order = torch.argsort(metadata.seq_lens, descending=True).to(torch.int32)
            return paged_decode_attention(
                query, kv_cache, metadata.block_tables, metadata.seq_lens, scale, num_splits,
                order=metadata.decode_order if self.longest_first else None, row_groups=metadata.row_groups)
        num_kv_heads = kv_cache.shape[3]
        group = query.shape[1] // num_kv_heads
        num_splits = self.num_prefill_splits(query.shape[0], num_kv_heads, group, metadata.max_seq_len)
        # a split step has few tokens (a prefix-cache hit of 9-64 new tokens; fewer run as decode
        # rows): 64-row tiles with 4 warps, not 128 with 8. attention_bench --prefix-hit, H100
        # (s7-call5), 16 tokens over 2k: 11.8 against 14.5 us a layer
        block_m, num_warps = (64, 4) if num_splits > 1 else (128, 8)
        if metadata.prefill_tile_map is None:  # once per forward: every layer has the same tiles
            metadata.prefill_tile_map = prefill_tile_map(
                metadata.query_start_loc, query.shape[0], prefill_tokens_per_tile(group, block_m))
        return paged_prefill_attention(
            query, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, scale,
            tile_map=metadata.prefill_tile_map, num_splits=num_splits,
            split_programs=-(-self.programs_per_sm * self.num_sms // num_kv_heads), block_m=block_m,
            num_warps=num_warps)
