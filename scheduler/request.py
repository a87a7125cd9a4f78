"""A request and its sequences: the scheduler's own state, never sent across an actor boundary.

A request with n > 1 is n sibling sequences over one prompt. Sibling 0 prefills alone; once its
prompt is computed the others fork its full prompt blocks (shared by reference count, prefix
caching on or off) and compute only the rest: the partial tail block, or the last full block when
the prompt ends on a block boundary, because each sibling needs the last prompt token's logits
for its own first sample. No block is ever written by two sequences, so the worker needs no
copy-on-write.
"""
import enum
import struct
import time
from collections.abc import Sequence as Seq

from scheduler.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, never scheduled on this replica (or its state was drained elsewhere)
    RUNNING = 1  # the replica holds its state and blocks
    PREEMPTED = 2  # blocks freed; back in the waiting queue, resent in full when rescheduled
    FINISHED_STOPPED = 3  # eos, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}

# Length is only ever detected on a token just sampled, so only a running sequence reaches it.
_LEGAL_TRANSITIONS = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED,
                            RequestStatus.FINISHED_ABORTED},
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED, RequestStatus.FINISHED_STOPPED,
                            RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED,
                              RequestStatus.FINISHED_ABORTED},
}


class IllegalTransitionError(RuntimeError):
    """A scheduler bug: a sequence was moved between states in a way the lifecycle forbids."""


def pack_token_ids(token_ids: Seq[int]) -> bytes:
    """Token ids as native int32 bytes: the prefix cache's block keys. int32 holds every id (the
    entry points check them against the vocabulary); struct packs a 2k-token list in ~20 us where
    array() took ~45 (CI machine)."""
    return struct.pack(f"{len(token_ids)}i", *token_ids)


def token_slice(prompt_token_ids: list[int], output_token_ids: list[int], start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
    num_prompt = len(prompt_token_ids)
    if end <= num_prompt:
        return prompt_token_ids[start:end]
    if start >= num_prompt:
        return output_token_ids[start - num_prompt:end - num_prompt]
    return prompt_token_ids[start:] + output_token_ids[:end - num_prompt]


class Sequence:
    """One sibling of a request: what the scheduler batches and a replica holds state for.

    seq_id is f"{req_id}#{index}" for every request, n == 1 included: ids stay unique across
    requests (everything after the last '#' is the index) and the worker's id never changes
    shape with n.
    """

    def __init__(self, request: "Request", index: int):
        self.request = request
        self.req_id = request.req_id
        self.seq_id = f"{request.req_id}#{index}"
        self.index = index
        self.sampling_params = request.sampling_params
        self.priority = request.priority
        self.arrival_time = request.arrival_time
        self.order = 0  # set by the scheduler that queues it: the policy's final tie-break
        self.prompt_token_ids = request.prompt_token_ids  # shared by the siblings, never mutated
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is (or is being) written this step
        # tokens sampled by steps in flight and not yet appended: the scheduler may schedule the
        # next step before the last one's token is back (the worker feeds it in), so a sequence
        # counts as num_tokens + num_pending long; its KV past num_tokens is for those tokens
        self.num_pending = 0
        self.num_cached_tokens = 0  # prompt tokens not computed at first admission: prefix hit or fork
        self.block_ids: list[int] = []
        # the prefix cache's node of each leading full block keyed so far (block_manager.py)
        self.block_nodes: list[bytes] = []
        self.stop_reason: int | str | None = None
        self._status = RequestStatus.WAITING

    @property
    def status(self) -> RequestStatus:
        return self._status

    @status.setter
    def status(self, new: RequestStatus) -> None:
        if new not in _LEGAL_TRANSITIONS.get(self._status, ()):
            raise IllegalTransitionError(f"{self.seq_id}: {self._status.name} -> {new.name}")
        self._status = new

    @property
    def is_finished(self) -> bool:
        return self._status.is_finished

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self._status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_ids})")


class Request:
    """A caller's request: n sibling sequences over one prompt.

    This is also the unit that drain_requests() hands out and add_resumed() takes back, so it
    carries everything needed to resume elsewhere: the prompt, the params, each sibling's output.
    """

    def __init__(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 priority: int = 0, arrival_time: float | None = None, packed_prompt: bytes | None = None):
        """packed_prompt: pack_token_ids(prompt_token_ids) where the caller has it already."""
        assert packed_prompt is None or len(packed_prompt) == 4 * len(prompt_token_ids), "not this prompt's packing"
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.seqs = [Sequence(self, i) for i in range(sampling_params.n)]
        # siblings that start once seqs[0] has computed the prompt, forking its full blocks
        self.pending_siblings: list[Sequence] = self.seqs[1:]
        self._packed_prompt = packed_prompt

    def packed_prompt(self) -> bytes:
        """The prompt as int32 bytes, packed once: its lookup and its keying after the prefill share it."""
        if self._packed_prompt is None:
            self._packed_prompt = pack_token_ids(self.prompt_token_ids)
        return self._packed_prompt

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def unfinished_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.is_finished]

    def __repr__(self) -> str:
        return f"Request({self.req_id}, n={len(self.seqs)}, prompt={self.num_prompt_tokens} tokens)"
