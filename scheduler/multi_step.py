"""Multi-step decoding, the scheduler's half (SchedulerConfig.num_scheduler_steps = k > 1).

A step of one-token decodes becomes up to k forward passes on the worker, each sampling the
next token of every sequence still taking part (workers/multi_step.py runs them). Here each
sequence gets its extra tokens: computed-token counts, pending samples and blocks, as if it had
been scheduled k times; update_from_output then appends up to k tokens per sequence, stopping at
the first stop, so the outputs equal k single steps'.
"""
from scheduler.block_manager import BlockManager
from scheduler.output import CachedRequestData
from scheduler.request import Sequence


def extend_decodes(cached: CachedRequestData, num_scheduled: dict[str, int], budget: int,
                   seqs: dict[str, Sequence], block_manager: BlockManager, max_seq_len: int,
                   num_steps: int) -> tuple[int, int]:
    """Give each sequence of the step that samples up to num_steps - 1 more tokens: as many as its
    max_tokens, the sequence length limit, the budget and the free blocks allow (never by
    preempting). Sequences that want logprobs keep one token: a step returns one TokenLogprobs
    per sequence. Updates cached, num_scheduled and the sequences; returns (budget left, passes)."""
    # runs for every sequence of every multi-step, so comparisons stand in for min() and max():
    # ~0.3 us a sequence (scheduler_bench --num-scheduler-steps 8)
    block_size, passes, most = block_manager.block_size, 1, num_steps - 1
    for row, seq_id in enumerate(cached.req_ids):
        seq = seqs[seq_id]
        params = seq.sampling_params
        # num_output counts this step's sample: the scheduler's _advance made it pending
        num_prompt, num_output = len(seq.prompt_token_ids), len(seq.output_token_ids) + seq.num_pending
        if seq.num_computed_tokens != num_prompt + num_output - 1 or params.logprobs is not None:
            continue  # does not sample this step (a prefill chunk), or wants logprobs
        room = max_seq_len - num_prompt - num_output
        if params.max_tokens is not None and params.max_tokens - num_output < room:
            room = params.max_tokens - num_output
        extra = most if most < room else room
        if budget < extra:
            extra = budget
        if extra <= 0:
            continue
        total, held = seq.num_computed_tokens + extra, len(seq.block_ids) * block_size
        if total > held:
            if block_manager.can_allocate(seq, total):
                cached.new_block_ids[row] = cached.new_block_ids[row] + block_manager.allocate(seq, total)
            else:  # what its blocks hold already
                extra, total = held - seq.num_computed_tokens, held
                if extra <= 0:
                    continue
        seq.num_computed_tokens = total
        seq.num_pending += extra
        num_scheduled[seq_id] += extra
        budget -= extra
        if extra >= passes:
            passes = 1 + extra
    return budget, passes
