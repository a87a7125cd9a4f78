"""KV cache sizing and allocation for one replica (or one tensor-parallel shard of it)."""
import math

import torch

# The CPU has no device memory to profile; like vLLM's CPU backend we give the cache a fixed space.
CPU_KV_CACHE_BYTES = 2 * 1024**3


def kv_heads_and_dim(hf_config, tp_size: int = 1) -> tuple[int, int]:
    """Key-value heads on one rank (tp_size divides them: checked at start-up) and the head size."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return hf_config.num_key_value_heads // tp_size, head_dim


def bytes_per_block(hf_config, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    num_kv_heads, head_dim = kv_heads_and_dim(hf_config, tp_size)
    per_token = 2 * hf_config.num_hidden_layers * num_kv_heads * head_dim * dtype.itemsize
    return per_token * block_size


def blocks_needed_at_most(max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """More blocks than every sequence at full length can never be used."""
    return math.ceil(max_model_len / block_size) * max_num_seqs + 1


def num_blocks_for_bytes(free_bytes: int, block_bytes: int) -> int:
    return max(0, free_bytes // block_bytes)


def allocate_kv_caches(hf_config, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device, tp_size: int = 1) -> list[torch.Tensor]:
    """One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    num_kv_heads, head_dim = kv_heads_and_dim(hf_config, tp_size)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(hf_config.num_hidden_layers)]
