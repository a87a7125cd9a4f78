"""Rotary position embedding, neox style (rotate the two halves of each head), as HF Qwen3."""
import torch
from torch import nn

from workers.layers.rmsnorm import RMSNorm, fused_ops_for


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D]; cos/sin [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        # Same float32 arithmetic as HF so positions map to bit-identical angles.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_position, D]: cos in the first half, sin in the second; float32 whatever the model dtype
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions [T]; q [T, Hq, D]; k [T, Hkv, D]
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)

    def norm_and_rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        q_norm: RMSNorm, k_norm: RMSNorm, kv_write=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Qwen3's per-head q/k RMSNorm, then RoPE: one fused kernel on CUDA, else the two torch steps.

        kv_write = (v, kv_cache, slot_mapping): the fused kernel may also put k and v in the cache;
        then the k returned is None (the torch path always returns k and leaves the cache alone)."""
        # q [T, Hq, D]; k [T, Hkv, D]: may be views of the qkv projection (token stride > H * D)
        ops = fused_ops_for(q, k, q_norm.weight, k_norm.weight)
        if ops is not None and q_norm.eps == k_norm.eps:
            return ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.eps, self.cos_sin_cache, positions,
                                    kv_write=kv_write)
        return self(positions, q_norm(q), k_norm(k))


def get_rope_theta(hf_config) -> float:
    """rope_theta from a transformers 5 config (rope_parameters) or an older flat one."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only default RoPE)")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
