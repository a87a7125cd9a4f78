"""The root engine config: the per-package configs composed, read flat from kwargs or YAML.

Operators write one flat mapping (as vLLM engine args): `model`, `max_num_seqs`, `block_size`, ...
Each key belongs to exactly one section; unknown keys are rejected with the list of allowed ones.
"""
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.errors import InvalidRequestError
from workers.config import ModelConfig, ParallelConfig


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where workers run: auto picks CUDA when present, else the CPU.")
    use_ray: bool | None = Field(
        None, description="Run workers as Ray actors; default: only when data or tensor parallel size > 1.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. 'auto'); default: start an embedded local instance.")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Attention kernels: auto picks triton on CUDA and torch on the CPU.")
    enforce_eager: bool = Field(
        False, description="Disable CUDA graphs (decode steps, and steps of up to 2048 tokens).")
    async_scheduling: bool = Field(
        True, description="Schedule and prepare step N+1 while step N runs, so host work hides behind the device.")


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "runtime": RuntimeConfig,
}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model and how to load it.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="KV cache layout and size.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Batching policy.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Replicas and devices per replica.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Devices, Ray and kernels.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "EngineConfig":
        problem = _token_budget_problem(self.scheduler, self.model.max_model_len)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def wants_ray(self) -> bool:
        if self.runtime.use_ray is not None:
            return self.runtime.use_ray
        p = self.parallel
        return p.data_parallel_size > 1 or p.tensor_parallel_size > 1

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, **kwargs: Any) -> "EngineConfig":
        """Build from a flat mapping of field names; errors name the key and the allowed values."""
        flat = {**(values or {}), **kwargs}
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in flat.items():
            section = _section_of(key)
            if section is None:
                raise InvalidRequestError(key, f"unknown engine option; allowed: {', '.join(allowed_keys())}")
            if value is not None:  # None means "the default", as in LLM(...) keyword arguments
                sections[section][key] = value
        try:
            parts = {name: model(**sections[name]) for name, model in _SECTIONS.items()}
        except ValidationError as e:
            raise InvalidRequestError(*_describe(e)) from None
        problem = _token_budget_problem(parts["scheduler"], parts["model"].max_model_len)
        if problem:
            raise InvalidRequestError("max_num_batched_tokens", problem)
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        return cls.from_flat(engine_args_from_yaml(path))

    def to_flat(self) -> dict[str, Any]:
        return {k: v for name in _SECTIONS for k, v in getattr(self, name).model_dump().items()}


def _token_budget_problem(sched: SchedulerConfig, max_model_len: int | None) -> str | None:
    if not sched.enable_chunked_prefill and max_model_len is not None and sched.max_num_batched_tokens < max_model_len:
        return (f"must be >= max_model_len ({max_model_len}) when enable_chunked_prefill is false, "
                f"or no long prompt could ever run; got {sched.max_num_batched_tokens}")
    return None


def allowed_keys() -> list[str]:
    return sorted(k for model in _SECTIONS.values() for k in model.model_fields)


def _section_of(key: str) -> str | None:
    for name, model in _SECTIONS.items():
        if key in model.model_fields:
            return name
    return None


def _describe(error: ValidationError) -> tuple[str, str]:
    """The first problem as (key, message): the field's own name, not the section path."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = loc[0] if loc else "config"
    return key, f"{first['msg']} (got {first.get('input')!r})"


def engine_args_from_yaml(path: str | Path) -> dict[str, Any]:
    """Engine args from ray_config.yaml (Serve format: applications[*].args.engine) or a bare mapping."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise InvalidRequestError(str(path), "must hold a YAML mapping")
    if "applications" not in data:
        return data
    apps = data["applications"] or []
    for app in apps:
        args = app.get("args") or {}
        if "engine" in args:
            return dict(args["engine"] or {})
    raise InvalidRequestError("applications[].args.engine", f"no application in {path} carries engine args")
