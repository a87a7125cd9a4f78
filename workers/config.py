"""Configs the workers own: which model to load and how a replica spans devices."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field("Qwen/Qwen3-0.6B", min_length=1,
                       description="HuggingFace model id or a local directory with config.json.")
    tokenizer: str | None = Field(None, description="Tokenizer id or directory; defaults to the model's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype; auto is bfloat16 on CUDA and float32 on the CPU.")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt plus output, in tokens; defaults to the model's context length.")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="auto/safetensors load real weights; dummy keeps the architecture with random weights.")
    seed: int = Field(0, ge=0, description="Seed for dummy weights and unseeded sampling.")


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_parallel_size: int = Field(1, ge=1, le=1024, description="Number of model replicas.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Devices one replica spans.")
