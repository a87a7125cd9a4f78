"""Qwen3 dense decoder over a paged KV cache (the model itself, not transformers' module).

Parameter names follow the HF checkpoint except for the packed projections: q/k/v_proj live in
qkv_proj and gate/up_proj in gate_up_proj; load_weights maps one onto the other.
"""
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from workers.attention.base import AttentionBackend, AttentionMetadata
from workers.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                            RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding,
                            get_rope_theta)
from workers.layers import staged_decoder
from workers.parallel import TensorParallelGroup

# HF name fragment -> (our packed parameter fragment, shard id)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
    assert param.shape == loaded_weight.shape, f"{tuple(param.shape)} != {tuple(loaded_weight.shape)}"
    param.data.copy_(loaded_weight)


class Qwen3Attention(nn.Module):
    def __init__(self, config, parallel: TensorParallelGroup, attn_backend: AttentionBackend,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, parallel, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # per rank
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        parallel, bias=bias)
        # Qwen3's per-head norms on q and k, before RoPE; replicated on every rank.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one cos/sin table shared by all layers
        self.attn = attn_backend
        self.scale = self.head_dim**-0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # x [T, H]; kv_cache [2, num_blocks, block_size, Hkv, D]
        return self.o_proj(self.attend(positions, self.qkv_proj(x), kv_cache, attn_metadata))  # [T, H]

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
               attn_metadata: AttentionMetadata) -> torch.Tensor:
        """The projected q, k, v [T, (Hq + 2 Hkv) D] -> attention's output [T, Hq D], before o_proj."""
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        # a backend that takes K/V already in the cache lets the q/k kernel write them there
        kv_write = (v, kv_cache, attn_metadata.slot_mapping) if self.attn.takes_written_kv else None
        q, k = self.rotary_emb.norm_and_rotate(positions, q.unflatten(-1, (self.num_heads, self.head_dim)),
                                               k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                                               self.q_norm, self.k_norm, kv_write)  # [T, Hq, D], [T, Hkv, D] or None
        return self.attn.forward(q, k, v, kv_cache, attn_metadata, self.scale).flatten(1)  # [T, Hq D]


class Qwen3MLP(nn.Module):
    def __init__(self, config, parallel: TensorParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, parallel)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.gate_up_proj.forward_silu_mul(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config, parallel: TensorParallelGroup, attn_backend: AttentionBackend,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Qwen3Attention(config, parallel, attn_backend, rotary_emb)
        self.mlp = Qwen3MLP(config, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual [T, H] -> (x, residual) [T, H]: the layer's output is x + residual, an add left
        # to the next norm (fused with it on CUDA). residual None: x is the embedding.
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.forward_with_residual(x, residual)
        h = self.self_attn(positions, h, kv_cache, attn_metadata)
        h, residual = self.post_attention_layernorm.forward_with_residual(h, residual)
        return self.mlp(h), residual

    def forward_staged(self, positions: torch.Tensor, stream: torch.Tensor, kv_cache: torch.Tensor,
                       attn_metadata: AttentionMetadata, warps: tuple[int, int, int, int]) -> torch.Tensor:
        """The residual stream [T, H] (x + residual: the embedding before the first layer), updated
        in place: the same layer with its norms and adds in its GEMMs (staged_decoder.py); warps
        from staged_decoder.layer_warps."""
        staged_linear = staged_decoder.staged_linear
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv = staged_linear(stream, attn.qkv_proj.weight, warps[0], norm_weight=norm1.weight, eps=norm1.eps)
        staged_linear(attn.attend(positions, qkv, kv_cache, attn_metadata), attn.o_proj.weight, warps[1],
                      residual=stream)
        h = staged_linear(stream, mlp.gate_up_proj.weight, warps[2], silu_mul=True,
                          norm_weight=norm2.weight, eps=norm2.eps)
        return staged_linear(h, mlp.down_proj.weight, warps[3], residual=stream)


class Qwen3Model(nn.Module):
    def __init__(self, config, parallel: TensorParallelGroup, attn_backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, get_rope_theta(config))
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, parallel, attn_backend, rotary_emb)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:  # [T] -> [T, H]
        x, residual = self.embed_tokens(input_ids), None
        # a fresh copy per forward: what the first layer's backend derives from seq_lens (the decode
        # order, the prefill tiles) is shared by this forward's layers, never reused by a later forward or a CUDA graph
        # captured after a warm-up with the same metadata (that read a freed order tensor)
        attn_metadata = dataclasses.replace(attn_metadata, decode_order=None, prefill_tile_map=None)
        warps = staged_decoder.layer_warps(x, self.layers[0])  # every layer has the same shapes
        if warps is not None:  # a step of a few rows, on Hopper in bfloat16: seven kernels a layer, not nine
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x = layer.forward_staged(positions, x, kv_cache, attn_metadata, warps)
            return self.norm(x, out=out)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, kv_cache, attn_metadata, residual)
        return self.norm.forward_with_residual(x, residual, out=out)[0]


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config, parallel: TensorParallelGroup | None = None,
                 attn_backend: AttentionBackend | None = None):
        super().__init__()
        if attn_backend is None:
            from workers.attention.torch_ref import TorchRefBackend
            attn_backend = TorchRefBackend()
        self.config = config
        self.parallel = parallel or TensorParallelGroup.single()
        self.model = Qwen3Model(config, self.parallel, attn_backend)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, self.parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/positions [T] of one flat step -> hidden states [T, H] after the final norm,
        written into out [T, H] when given (CUDA graphs of many sizes share one output buffer)."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, out=out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (usually one row per sequence) -> logits [N, vocab] in the model's dtype, on
        every rank. The sampler widens them to float32 only where it does more than an argmax: at
        N=256 the float32 copy and its argmax read and wrote ~390 MB a step (~1% of a decode step)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF name, full tensor) pairs, each rank keeping its shard.

        Returns the names of our parameters now fully loaded (packed ones once every shard arrived).
        """
        params = dict(self.named_parameters())  # a tied lm_head shares the embedding and is not listed
        shards_seen: dict[str, set] = {}
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store it: it is the embedding
            name, shard_id = hf_name, None
            for fragment, (packed, shard) in PACKED_MODULES.items():
                if f".{fragment}." in hf_name:
                    name, shard_id = hf_name.replace(fragment, packed), shard
                    break
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no parameter in Qwen3ForCausalLM")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
            shards_seen.setdefault(name, set()).add(shard_id)
        num_shards = {"qkv_proj": 3, "gate_up_proj": 2}
        return {name for name, seen in shards_seen.items()
                if len(seen) == num_shards.get(name.split(".")[-2], 1)}

    def check_all_loaded(self, loaded: set[str]) -> None:
        missing = set(dict(self.named_parameters())) - loaded
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")
