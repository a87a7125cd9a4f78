"""What every part of the engine needs to know about the model before anything is loaded."""
import json
from dataclasses import dataclass
from pathlib import Path

from cluster.config import EngineConfig
from scheduler.errors import InvalidRequestError
from workers.model_configs import BUILTIN_CONFIGS, GENERATION_CONFIG, max_context_len, resolve_model


@dataclass
class ResolvedModel:
    hf_config: object  # transformers Qwen3Config
    model_dir: Path | None  # local directory, when there is one
    max_model_len: int
    eos_token_ids: list[int]
    tokenizer_name: str  # what load_tokenizer gets


def resolve(config: EngineConfig) -> ResolvedModel:
    m = config.model
    try:
        hf_config, model_dir = resolve_model(m.model, m.revision)
    except (OSError, ValueError) as e:  # a missing path, a bad repo id, no network, not qwen3
        raise InvalidRequestError("model", f"{m.model!r} is not a local directory with config.json, a built-in "
                                           f"id ({', '.join(BUILTIN_CONFIGS)}) or a reachable Qwen3 hub model: "
                                           f"{e}") from None
    try:
        max_model_len = max_context_len(hf_config, m.max_model_len)
    except ValueError as e:
        raise InvalidRequestError("max_model_len", str(e)) from None
    _check_parallel(config, hf_config)
    tokenizer_name = m.tokenizer or (str(model_dir) if model_dir else m.model)
    return ResolvedModel(hf_config, model_dir, max_model_len, eos_token_ids(hf_config, model_dir), tokenizer_name)


def eos_token_ids(hf_config, model_dir: Path | None) -> list[int]:
    """Every id that ends a generation: generation_config.json's eos ids, else the model config's."""
    gen = GENERATION_CONFIG if model_dir is None else {}
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        gen = json.loads((model_dir / "generation_config.json").read_text())
    ids = gen.get("eos_token_id", hf_config.eos_token_id)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if isinstance(hf_config.eos_token_id, int) and hf_config.eos_token_id not in ids:
        ids.append(hf_config.eos_token_id)
    return ids


def _check_parallel(config: EngineConfig, hf_config) -> None:
    tp = config.parallel.tensor_parallel_size
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp:
        raise InvalidRequestError(
            "tensor_parallel_size", f"must divide the model's {heads} attention heads, got {tp}")
    if kv_heads % tp:  # each rank holds whole key-value heads; none are replicated
        raise InvalidRequestError(
            "tensor_parallel_size", f"must divide the model's {kv_heads} key-value heads, got {tp}")
