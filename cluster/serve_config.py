"""The Ray Serve application's args (ray_config.yaml: applications[*].args), validated.

    args:
      engine: {model: Qwen/Qwen3-0.6B, data_parallel_size: 1, ...}   # flat EngineConfig options
      num_replicas: 1               # or autoscaling: {min_replicas, max_replicas, ...}
      max_ongoing_requests: 256
      ...

Everything beside `engine` becomes Serve deployment options (ServeAppArgs.deployment_options);
`engine` goes to EngineConfig.from_flat. Errors name the key as it sits in the YAML
(args.autoscaling.max_replicas, args.engine.max_num_seqs) and say what is allowed.
"""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config import EngineConfig
from scheduler.errors import InvalidRequestError

# Serve kills a replica this long after asking it to stop; our drain gets drain_timeout_s of it and
# stopping the engine (SchedulerActor.shutdown, placement groups removed) gets the rest.
ENGINE_STOP_S = 15.0


class PicklableInvalidRequestError(InvalidRequestError):
    """InvalidRequestError that survives pickling: Serve ships build, replica and handle errors across
    processes, and the base class' two-argument constructor would not unpickle."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.message = message

    def __reduce__(self):
        return type(self), (self.field, self.message)

    @classmethod
    def from_error(cls, error: InvalidRequestError, prefix: str = ""):
        return cls(prefix + error.field, str(error).removeprefix(f"{error.field}: "))


class ServeArgsError(PicklableInvalidRequestError):
    """A bad value in the application's args; `field` is its path, e.g. args.engine.max_num_seqs."""


class AutoscalingArgs(BaseModel):
    """Serve's request-based autoscaling of replicas; each replica is a whole engine."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 scales to zero (the next request "
                                                   "waits for an engine to load).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; default min_replicas.")
    target_ongoing_requests: float = Field(
        64, gt=0, description="Ongoing requests per replica that autoscaling aims for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long load must stay low before removing one.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self


class ServeAppArgs(BaseModel):
    """applications[*].args of ray_config.yaml, for import_path cluster.serve_app:build_app."""

    model_config = ConfigDict(extra="forbid")

    engine: dict[str, Any] = Field(
        default_factory=dict, description="Flat engine options (EngineConfig.from_flat): model, "
                                          "data_parallel_size, tensor_parallel_size, max_num_seqs, ...")
    num_replicas: int = Field(1, ge=1, description="Serve replicas, each a whole engine "
                                                   "(data_parallel_size x tensor_parallel_size GPUs); "
                                                   "leave unset with autoscaling.")
    autoscaling: AutoscalingArgs | None = Field(None, description="Scale replicas with load instead of num_replicas.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests (streams) one replica serves at once; Serve queues the rest. "
                               "Keep it >= data_parallel_size x max_num_seqs to fill the engine's batches.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests Serve queues for the deployment (per caller) beyond those; more get "
                               "RESOURCE_EXHAUSTED (HTTP 503). -1: unbounded. Not the engine's own "
                               "engine.max_queued_requests.")
    health_check_period_s: float = Field(
        10.0, gt=0, description="How often Serve calls check_health (engine live and making progress).")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On replica shutdown: how long open streams may finish before they are aborted.")
    replica_num_cpus: float = Field(
        1.0, ge=0, description="CPUs the replica actor (tokenizer, detokenizer, relaying) reserves. It never "
                               "reserves a GPU: the engine's workers take GPUs in their own placement groups.")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "ServeAppArgs":
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling, not both")
        target = self.autoscaling.target_ongoing_requests if self.autoscaling else None
        if target is not None and target > self.max_ongoing_requests:
            raise ValueError(f"autoscaling.target_ongoing_requests ({target:g}) must be <= "
                             f"max_ongoing_requests ({self.max_ongoing_requests}), or replicas never fill up")
        return self

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeAppArgs":
        """Validate the whole of args, engine included; raises ServeArgsError naming the key."""
        if args is not None and not isinstance(args, dict):
            raise ServeArgsError("args", f"must be a mapping, got {type(args).__name__}")
        try:
            parsed = cls(**(args or {}))
        except ValidationError as e:
            raise ServeArgsError(*_describe(e)) from None
        parsed.engine_config()  # fail at build time, not in every replica
        return parsed

    def engine_config(self) -> EngineConfig:
        try:
            return EngineConfig.from_flat(self.engine)
        except InvalidRequestError as e:
            raise ServeArgsError.from_error(e, prefix="args.engine.") from None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of Deployment.options()."""
        options: dict[str, Any] = dict(
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
            graceful_shutdown_timeout_s=self.drain_timeout_s + ENGINE_STOP_S,
            ray_actor_options={"num_cpus": self.replica_num_cpus, "num_gpus": 0},
        )
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


def allowed_keys(model: type[BaseModel] = ServeAppArgs) -> list[str]:
    return sorted(model.model_fields)


def _describe(error: ValidationError) -> tuple[str, str]:
    """The first problem as (key path under args, message saying what is allowed)."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(["args", *loc])
    if first["type"] == "extra_forbidden":
        return key, f"unknown option; allowed: {', '.join(allowed_keys(_model_at(loc[:-1])))}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # a model validator's own message says it all
        return key, message
    return key, f"{message} (got {first.get('input')!r})"


def _model_at(path: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = ServeAppArgs
    for part in path:
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        model = annotation
    return model
