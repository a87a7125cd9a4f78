"""The replica-side copy of every running sequence, updated from each step's diffs.

The scheduler sends a sequence in full once (NewRequestData) and then only what changed
(new block ids, num_computed_tokens). The worker appends the tokens it samples itself, so the
next step's input token never has to cross the actor boundary.
"""
import itertools
from dataclasses import dataclass

import numpy as np

from scheduler.output import SchedulerOutput
from scheduler.request import token_slice
from scheduler.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    sibling_index: int
    block_ids: list[int]
    num_computed_tokens: int
    num_pending: int = 0  # tokens sampled by launched passes and not yet appended

    def __post_init__(self):
        # the block table as an array too, so a step copies it row-wise instead of converting lists
        self.block_array = np.asarray(self.block_ids, dtype=np.int32)

    def add_blocks(self, block_ids: list[int]) -> None:
        if block_ids:
            self.block_ids.extend(block_ids)
            self.block_array = np.asarray(self.block_ids, dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < num_prompt else self.output_token_ids[position - num_prompt]

    def token_slice(self, start: int, end: int) -> list[int]:
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)


@dataclass
class StepInputs:
    """Host arrays for one flat batch of T tokens from S sequences."""

    req_ids: list[str]  # [S] in batch order
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, max_blocks] int32
    logits_indices: np.ndarray  # [N] int64: last token of each sequence that samples this step
    sampling_req_ids: list[str]  # [N] the sequences that sample
    # input tokens still on the device: (index into input_ids, req_id) of tokens sampled by the
    # step in flight, which the runner copies in on the device (placeholders 0 in input_ids)
    pending_inputs: list[tuple[int, str]]
    # [S] each sequence's tokens this step (query_start_loc's differences) as Python ints: the
    # graphs' checks and layouts read them for a few rows, where numpy's fixed cost dominates
    query_lens: list[int]


# steps of at most this many tokens compute positions and slots per token in Python, where the
# vectorised form's fixed cost is larger: a warm prefix hit's prepare 49 -> 22 us in place (CPU
# machine); decode batches in a hot loop 4 against 9 us at 1 row, 30 against 29 at 32 rows
FEW_TOKENS = 32


class InputBatch:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.requests: dict[str, CachedRequestState] = {}

    def update(self, step: SchedulerOutput) -> None:
        for req_id in step.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in step.scheduled_new_reqs:
            # the prompt is shared, never copied: no one mutates a prompt (scheduler.request), and
            # copying a long one cost more than the rest of the update; outputs and blocks grow here
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, new.prompt_token_ids, list(new.output_token_ids), new.sampling_params,
                new.sibling_index, list(new.block_ids), new.num_computed_tokens)
        cached = step.scheduled_cached_reqs
        for req_id, block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            state = self.requests[req_id]
            state.add_blocks(block_ids)
            state.num_computed_tokens = num_computed

    def prepare(self, step: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        counts = step.num_scheduled_tokens
        req_ids = list(counts)
        states = [self.requests[r] for r in req_ids]
        # per-sequence values stay Python ints in the loop and become arrays once after it:
        # numpy scalar reads and writes cost more than the rest of a decode's row
        starts = list(itertools.accumulate(counts.values(), initial=0))  # [S + 1] query starts
        total = starts[-1]
        input_ids = np.empty(total, dtype=np.int64)
        seq_lens = []
        max_blocks = max((len(s.block_ids) for s in states), default=1)
        block_tables = np.zeros((len(req_ids), max(max_blocks, 1)), dtype=np.int32)
        logits_indices, sampling_req_ids, pending_inputs = [], [], []
        # a step of few tokens (a decode batch, a prefix-cache hit) takes positions and slots in
        # the loop: the vectorised form below is ~15 numpy calls whatever the size, most of
        # prepare's time for a handful of tokens
        few = total <= FEW_TOKENS
        positions, slots = [], []
        for i, (state, n, lo) in enumerate(zip(states, counts.values(), starts)):
            start, end, num_known = state.num_computed_tokens, state.num_computed_tokens + n, state.num_tokens
            if few:
                table = state.block_ids
                for pos in range(start, end):
                    positions.append(pos)
                    slots.append(table[pos // bs] * bs + pos % bs)
            if start >= num_known:  # only a decode is scheduled past the known tokens: its
                # input is the newest token sampled, by a pass still in flight
                assert start == num_known + state.num_pending - 1 and n == 1, \
                    f"{state.req_id}: scheduled past its tokens"
                input_ids[lo] = 0
                pending_inputs.append((lo, state.req_id))
            elif n == 1:  # decode: the common case, kept cheap
                input_ids[lo] = state.token_at(start)
            else:
                input_ids[lo:lo + n] = state.token_slice(start, end)
            seq_lens.append(end)
            block_tables[i, :len(state.block_array)] = state.block_array
            if end == num_known + state.num_pending:  # caught up: the last logits give the next token
                logits_indices.append(lo + n - 1)
                sampling_req_ids.append(state.req_id)
        query_start_loc = np.array(starts, dtype=np.int32)
        seq_lens = np.array(seq_lens, dtype=np.int32)
        if few:
            positions, slot_mapping = np.array(positions, dtype=np.int64), np.array(slots, dtype=np.int64)
        else:
            num_tokens = np.fromiter(counts.values(), np.int64, len(req_ids))
            row_of_token = np.repeat(np.arange(len(req_ids)), num_tokens)
            # position of each token: its sequence's first new position plus its offset in the query
            positions = (np.arange(total) - query_start_loc[row_of_token] + (seq_lens - num_tokens)[row_of_token])
            slot_mapping = block_tables[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        return StepInputs(req_ids, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                          block_tables, np.asarray(logits_indices, dtype=np.int64), sampling_req_ids,
                          pending_inputs, list(counts.values()))
