"""Built-in configs of the public Qwen3 dense models, so dummy weights need no hub access, and
resolve_model, which turns ModelConfig.model into an HF config (plus a local directory when one exists).
"""
import json
import os
from pathlib import Path

from transformers import Qwen3Config

IM_END_ID = 151645  # <|im_end|>: end of a chat turn
ENDOFTEXT_ID = 151643  # <|endoftext|>: end of a document, also bos and pad

# Values shared by every Qwen3 dense size, as in the released config.json files.
_COMMON = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "use_cache": True,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}


def _size(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict:
    return {**_COMMON, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "max_window_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "tie_word_embeddings": tied}


BUILTIN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-0.6B": _size(1024, 3072, 28, 16, 8, tied=True),
    "Qwen/Qwen3-1.7B": _size(2048, 6144, 28, 16, 8, tied=True),
    "Qwen/Qwen3-4B": _size(2560, 9728, 36, 32, 8, tied=True),
    "Qwen/Qwen3-8B": _size(4096, 12288, 36, 32, 8, tied=False),
    "Qwen/Qwen3-14B": _size(5120, 17408, 40, 40, 8, tied=False),
    "Qwen/Qwen3-32B": _size(5120, 25600, 64, 64, 8, tied=False),
}

# generation_config.json of the Qwen3 chat models: either token ends a generation.
GENERATION_CONFIG: dict = {
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def is_builtin(model: str) -> bool:
    return model in BUILTIN_CONFIGS


def cached_snapshot_dir(model: str, revision: str | None) -> Path | None:
    """The local hub-cache snapshot holding model's config.json, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(path).parent if isinstance(path, str) else None


def download_model(model: str, revision: str | None, weights: bool) -> Path:
    """Snapshot of a hub repo: configs and tokenizer files, plus the safetensors when weights is set."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"] + (["*.safetensors"] if weights else [])
    return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))


def load_hf_config(model_dir: str | os.PathLike) -> Qwen3Config:
    with open(Path(model_dir) / "config.json") as f:
        config = json.load(f)
    if config.get("model_type") != "qwen3":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model; folovllm serves qwen3 only")
    return Qwen3Config.from_dict(config)


def resolve_model(model: str, revision: str | None = None) -> tuple[Qwen3Config, Path | None]:
    """(HF config, local model dir or None) for a local directory, a built-in id or any hub id.

    A built-in id resolves offline: its hub-cache snapshot when one is there, else the built-in
    config and no directory (enough for dummy weights; real weights are downloaded by the loader).
    """
    if (Path(model) / "config.json").is_file():
        return load_hf_config(model), Path(model)
    if is_builtin(model):
        cached = cached_snapshot_dir(model, revision)
        if cached is not None:
            return load_hf_config(cached), cached
        return Qwen3Config.from_dict(dict(BUILTIN_CONFIGS[model])), None
    model_dir = download_model(model, revision, weights=False)
    return load_hf_config(model_dir), model_dir


def max_context_len(hf_config: Qwen3Config, max_model_len: int | None = None) -> int:
    """ModelConfig.max_model_len, defaulting to (and bounded by) the model's context length."""
    limit = hf_config.max_position_embeddings
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {limit}")
    return max_model_len or limit
