"""Build a Qwen3ForCausalLM on its device and fill it: safetensors from a model directory, or dummy weights.

The model is constructed under torch.device(device) with the target default dtype and every weight
is torch.empty, so an 8B model is allocated once, in place, with no CPU copy and no init kernels.
"""
import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from workers.attention import get_attention_backend
from workers.attention.base import AttentionBackend
from workers.config import ModelConfig
from workers.model_configs import download_model
from workers.parallel import TensorParallelGroup
from workers.qwen3 import Qwen3ForCausalLM

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DUMMY_STD = 0.02  # HF's initializer_range: keeps dummy logits in a sane range


def resolve_dtype(dtype: str, device: torch.device | str, config_dtype: torch.dtype | str | None = None) -> torch.dtype:
    """ModelConfig.dtype -> torch dtype. auto: float32 on the CPU; on CUDA the checkpoint's half type
    (float16 when it says so) and bfloat16 otherwise, since float32 checkpoints are served in half."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if torch.device(device).type != "cuda":
        return torch.float32
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype.removeprefix("torch."))
    return torch.float16 if config_dtype == torch.float16 else torch.bfloat16


def checkpoint_dtype(hf_config) -> torch.dtype | str | None:
    """The dtype a config.json names. transformers >= 4.56 keeps it as `dtype` and warns on every
    read of the older `torch_dtype`, which is all that earlier versions have."""
    if "dtype" in vars(hf_config):
        return hf_config.dtype
    return getattr(hf_config, "torch_dtype", None)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_dir_for_weights(model_config: ModelConfig) -> Path:
    """The local directory holding model_config.model's safetensors, downloading them if needed."""
    local = Path(model_config.model)
    if local.is_dir():
        return local
    return download_model(model_config.model, model_config.revision, weights=True)


def iterate_safetensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every *.safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def hf_weight_shapes(hf_config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and full (unsharded) shapes of a Qwen3 HF checkpoint's tensors."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q_size, kv_size = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    yield "model.embed_tokens.weight", (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (c.hidden_size,)
        yield p + "self_attn.q_proj.weight", (q_size, c.hidden_size)
        yield p + "self_attn.k_proj.weight", (kv_size, c.hidden_size)
        yield p + "self_attn.v_proj.weight", (kv_size, c.hidden_size)
        yield p + "self_attn.q_norm.weight", (head_dim,)
        yield p + "self_attn.k_norm.weight", (head_dim,)
        yield p + "self_attn.o_proj.weight", (c.hidden_size, q_size)
        yield p + "post_attention_layernorm.weight", (c.hidden_size,)
        yield p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)
        yield p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)
        yield p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)
    yield "model.norm.weight", (c.hidden_size,)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", (c.vocab_size, c.hidden_size)


def dummy_weights(hf_config, seed: int, device: torch.device | str,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Random full-size HF tensors, drawn in a fixed order from one seeded generator.

    Every rank draws the same full tensors and keeps its shard, so dummy weights do not depend on
    tp_size. Norm weights are ones and matrices normal(0, DUMMY_STD), as HF initialises Qwen3.
    """
    device = torch.device(device)
    # A meta device (shape checks) has no generator and no data to draw.
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    for name, shape in hf_weight_shapes(hf_config):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(0.0, DUMMY_STD, generator=generator)


def load_model(model_config: ModelConfig, hf_config, device: torch.device | str, dtype: torch.dtype,
               parallel: TensorParallelGroup | None = None,
               attn_backend: AttentionBackend | None = None) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM in eval mode on device/dtype, this rank's shard of the weights loaded."""
    device = torch.device(device)
    attn_backend = attn_backend or get_attention_backend("auto", device)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen3ForCausalLM(hf_config, parallel or TensorParallelGroup.single(), attn_backend)
    if model_config.load_format == "dummy":
        weights = dummy_weights(hf_config, model_config.seed, device, dtype)
    else:
        weights = iterate_safetensors(model_dir_for_weights(model_config))
    with torch.no_grad():
        model.check_all_loaded(model.load_weights(weights))
    return model.eval()
