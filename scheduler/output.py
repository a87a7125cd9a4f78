"""The step contract: what the scheduler sends a replica each step and what comes back.

Everything here is a dataclass of plain Python values so that it crosses a Ray actor boundary
cheaply: never tensors, never Request objects. Running requests travel as diffs.
"""
from dataclasses import dataclass, field, fields
from operator import attrgetter

from scheduler.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A sequence the replica has no state for: first scheduled, or resumed after preemption."""

    req_id: str  # sequence id: unique per sibling of an n > 1 request
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption; recomputed, never resampled
    sampling_params: SamplingParams
    sibling_index: int  # which of the n siblings this is; seeds its sampling
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Diffs for sequences the replica already holds (parallel lists)."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to the block table
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    step_id: int
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    # sequences whose replica-side state must be dropped before this step runs:
    # finished, aborted or preempted since the last step
    finished_req_ids: list[str] = field(default_factory=list)
    # > 1 (multi-step, SchedulerConfig.num_scheduler_steps): every scheduled sequence decodes and
    # the worker runs this many forward passes; a sequence with n scheduled tokens takes part in
    # the first n, each pass feeding it the token the pass before sampled
    decode_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0 and not self.finished_req_ids


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token and the top-N alternatives at that position."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # per sequence: [] while a prefill is only partly computed, else the sampled tokens, one per
    # forward pass it took part in (one, unless the step had decode_steps > 1)
    sampled_token_ids: list[list[int]]
    # per sequence: None unless SamplingParams.logprobs was set and a token was sampled
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)


@dataclass
class EngineCoreOutput:
    """One request-sibling's progress in one step: what the frontend turns into a delta."""

    req_id: str  # the caller's request id
    index: int  # sibling index for n > 1
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_OUTPUT_FIELDS = attrgetter(*(f.name for f in fields(EngineCoreOutput)))


def pack_outputs(outputs: list[EngineCoreOutput]) -> tuple:
    """EngineCoreOutputs as one column per field, for crossing a process boundary: pickling 256
    dataclass instances costs ~7x as much (0.67 against 0.09 ms on the CI machine)."""
    return tuple(zip(*map(_OUTPUT_FIELDS, outputs)))


def unpack_outputs(columns: tuple) -> list[EngineCoreOutput]:
    return list(map(EngineCoreOutput, *columns)) if columns else []
