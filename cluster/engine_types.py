"""What a frontend sees of the engine: the EngineClient contract and the plain types it returns.

cluster/engine_client.py implements EngineClientProtocol on Ray; frontends (the gRPC server, the
offline LLM class) are typed against the protocol so that tests can drive them with a fake.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Protocol, Union

from scheduler.output import EngineCoreOutput
from scheduler.sampling_params import SamplingParams


@dataclass
class ModelInfo:
    model: str  # HF id or local path, as configured
    max_model_len: int  # prompt + output tokens
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class ReplicaStatus:
    replica_id: int
    live: bool
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use, [0, 1]
    prefix_cache_hit_rate: float  # fraction of prompt tokens served from cache, [0, 1]
    worker_restarts: int


@dataclass
class EngineStatus:
    replicas: list[ReplicaStatus]
    num_waiting: int  # requests queued in the engine
    any_live: bool
    making_progress: bool  # false when work is pending but no step completed for a while
    num_preemptions: int  # cumulative since the engine started


OutputStream = AsyncIterator[list[EngineCoreOutput]]


class EngineClientProtocol(Protocol):
    """The engine as a frontend uses it. Errors come from scheduler.errors."""

    model_info: ModelInfo

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, priority: int = 0,
                    ) -> Union[Awaitable[OutputStream], OutputStream]:
        """Validate eagerly (InvalidRequestError naming the field, QueueFullError,
        EngineDeadError), then yield once per engine step the EngineCoreOutputs of the request's
        siblings that made progress; the stream ends once every sibling has finished.

        Declared `async def` returning the stream; callers also accept a plain async generator.
        """

    async def finish(self, request_id: str, index: int, stop_reason: str) -> None:
        """A stop string matched in the frontend: stop that sibling and free its blocks."""

    async def abort(self, request_id: str) -> None:
        """Cancel, disconnect or deadline: stop every sibling and free their blocks."""

    async def status(self) -> EngineStatus:
        ...


async def open_output_stream(engine: EngineClientProtocol, request_id: str,
                             prompt_token_ids: list[int], sampling_params: SamplingParams,
                             priority: int = 0) -> OutputStream:
    """engine.add_request, awaited when it is a coroutine so that validation errors raise here."""
    stream = engine.add_request(request_id, prompt_token_ids, sampling_params, priority)
    if hasattr(stream, "__await__"):
        stream = await stream
    return stream
