"""protobuf <-> Python at the gRPC boundary; nothing else in the server or client touches messages.

Parsing raises scheduler.errors.InvalidRequestError naming the field, which the server maps to
INVALID_ARGUMENT in one place.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, fields

from cluster.engine_types import EngineStatus, ModelInfo, ReplicaStatus
from cluster.output_processor import RequestDelta
from protos.folovllm.v1 import llm_pb2 as pb
from scheduler.errors import InvalidRequestError
from scheduler.output import TokenLogprobs
from scheduler.sampling_params import SamplingParams

MAX_REQUEST_ID_LEN = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
_LIST_FIELDS = ("stop", "stop_token_ids")
# SamplingParams fields that are proto3 `optional`s of the same name (all but the repeated ones;
# tests/unit/test_proto_stubs.py checks that none is missing from the proto)
_SCALAR_FIELDS = tuple(f.name for f in fields(SamplingParams)
                       if f.name not in _LIST_FIELDS and f.name in pb.SamplingParams.DESCRIPTOR.fields_by_name)


@dataclass
class GenerateInput:
    request_id: str
    prompt: str | None  # exactly one of prompt / prompt_token_ids
    prompt_token_ids: list[int] | None
    sampling_params: SamplingParams
    priority: int


@dataclass
class ChatInput:
    request_id: str
    messages: list[dict[str, str]]  # [{"role": ..., "content": ...}], what chat templates take
    sampling_params: SamplingParams
    priority: int
    enable_thinking: bool | None


@dataclass
class ServerStatus(EngineStatus):
    num_in_flight: int = 0  # Generate/Chat streams open on the server
    draining: bool = False


# --- requests (server side) -----------------------------------------------------------------

def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _SCALAR_FIELDS if msg.HasField(name)}
    if msg.no_max_tokens:
        if msg.HasField("max_tokens"):
            raise InvalidRequestError("max_tokens", "must be unset when no_max_tokens is true")
        kwargs["max_tokens"] = None
    kwargs["stop"] = list(msg.stop)
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    return SamplingParams(**kwargs)


def request_id_from_proto(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_LEN} characters, "
                                                f"got {len(request_id)}")
    return request_id or f"req-{uuid.uuid4().hex}"


def generate_input_from_proto(req: pb.GenerateRequest) -> GenerateInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("prompt", "set prompt (text) or prompt_token_ids")
    return GenerateInput(
        request_id=request_id_from_proto(req.request_id),
        prompt=req.prompt if which == "prompt" else None,
        prompt_token_ids=list(req.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        sampling_params=sampling_params_from_proto(req.sampling_params),
        priority=req.priority)


def chat_messages_from_proto(messages, field: str = "messages") -> list[dict[str, str]]:
    if not messages:
        raise InvalidRequestError(field, "must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"{field}[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, "
                                                            f"got {m.role!r}")
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_input_from_proto(req: pb.ChatRequest) -> ChatInput:
    return ChatInput(
        request_id=request_id_from_proto(req.request_id),
        messages=chat_messages_from_proto(req.messages),
        sampling_params=sampling_params_from_proto(req.sampling_params),
        priority=req.priority,
        enable_thinking=req.enable_thinking if req.HasField("enable_thinking") else None)


# --- requests (client side) -----------------------------------------------------------------

def sampling_params_to_proto(params: SamplingParams | None, only_changed: bool = True) -> pb.SamplingParams:
    """Fields equal to the SamplingParams default stay unset unless only_changed is False."""
    msg = pb.SamplingParams()
    if params is None:
        return msg
    default = SamplingParams()
    for name in _SCALAR_FIELDS:
        value = getattr(params, name)
        if value is not None and (not only_changed or value != getattr(default, name)):
            setattr(msg, name, value)
    msg.no_max_tokens = params.max_tokens is None
    msg.stop.extend(params.stop)
    msg.stop_token_ids.extend(params.stop_token_ids)
    return msg


def chat_messages_to_proto(messages: list[dict[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


# --- responses --------------------------------------------------------------------------------

def delta_to_proto(delta: RequestDelta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=delta.request_id, index=delta.index, text=delta.text, token_ids=delta.token_ids,
        usage=pb.Usage(prompt_tokens=delta.num_prompt_tokens,
                       completion_tokens=delta.num_completion_tokens,
                       cached_prompt_tokens=delta.num_cached_tokens))
    for lp in delta.logprobs or ():
        msg.logprobs.add(logprob=lp.logprob, top_token_ids=lp.top_token_ids,
                         top_logprobs=lp.top_logprobs)
    if delta.finish_reason is not None:
        msg.finish_reason = delta.finish_reason
    if isinstance(delta.stop_reason, str):
        msg.stop_str = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        msg.stop_token_id = delta.stop_reason
    return msg


def delta_from_proto(msg: pb.GenerateResponse) -> RequestDelta:
    which = msg.WhichOneof("stop_reason")
    return RequestDelta(
        request_id=msg.request_id, index=msg.index, text=msg.text, token_ids=list(msg.token_ids),
        logprobs=[TokenLogprobs(lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs))
                  for lp in msg.logprobs] or None,
        finish_reason=msg.finish_reason if msg.HasField("finish_reason") else None,
        stop_reason=getattr(msg, which) if which else None,
        num_prompt_tokens=msg.usage.prompt_tokens,
        num_completion_tokens=msg.usage.completion_tokens,
        num_cached_tokens=msg.usage.cached_prompt_tokens)


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                        eos_token_ids=info.eos_token_ids,
                        default_sampling_params=sampling_params_to_proto(SamplingParams(),
                                                                         only_changed=False))


def model_info_from_proto(msg: pb.ModelInfo) -> tuple[ModelInfo, SamplingParams]:
    info = ModelInfo(model=msg.model, max_model_len=msg.max_model_len, vocab_size=msg.vocab_size,
                     eos_token_ids=list(msg.eos_token_ids))
    return info, sampling_params_from_proto(msg.default_sampling_params)


def status_to_proto(status: EngineStatus, num_in_flight: int, draining: bool) -> pb.ServerStatus:
    return pb.ServerStatus(
        replicas=[pb.ReplicaStatus(replica_id=r.replica_id, live=r.live, num_running=r.num_running,
                                   num_waiting=r.num_waiting, kv_usage=r.kv_usage,
                                   prefix_cache_hit_rate=r.prefix_cache_hit_rate,
                                   worker_restarts=r.worker_restarts) for r in status.replicas],
        num_waiting=status.num_waiting, any_live=status.any_live,
        making_progress=status.making_progress, num_preemptions=status.num_preemptions,
        num_in_flight=num_in_flight, draining=draining)


def status_from_proto(msg: pb.ServerStatus) -> ServerStatus:
    return ServerStatus(
        replicas=[ReplicaStatus(r.replica_id, r.live, r.num_running, r.num_waiting, r.kv_usage,
                                r.prefix_cache_hit_rate, r.worker_restarts) for r in msg.replicas],
        num_waiting=msg.num_waiting, any_live=msg.any_live, making_progress=msg.making_progress,
        num_preemptions=msg.num_preemptions, num_in_flight=msg.num_in_flight, draining=msg.draining)
