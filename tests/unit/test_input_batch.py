"""InputBatch.prepare: the per-token path of small steps and the vectorised one of larger steps
lay out the same step."""
import random
from types import SimpleNamespace

import numpy as np
import pytest

from scheduler.sampling_params import SamplingParams
from workers import input_batch
from workers.input_batch import CachedRequestState, InputBatch

BLOCK_SIZE = 4


def _batch_and_step(rng: random.Random, num_seqs: int) -> tuple[InputBatch, SimpleNamespace]:
    batch = InputBatch(BLOCK_SIZE)
    counts = {}
    free = list(range(1, 2000))
    rng.shuffle(free)
    for i in range(num_seqs):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
        outputs = [rng.randrange(1000) for _ in range(rng.choice([0, 0, rng.randint(1, 9)]))]
        total = len(prompt) + len(outputs)
        if outputs:  # a decode: everything but the newest token computed
            computed, n = total - 1, 1
        else:  # a prefill chunk, a prefix-cache hit's tail, or the whole prompt
            computed = rng.randint(0, total - 1)
            n = rng.randint(1, total - computed)
        blocks = [free.pop() for _ in range(-(-(computed + n) // BLOCK_SIZE))]
        req_id = f"r{i}"
        batch.requests[req_id] = CachedRequestState(req_id, prompt, outputs, SamplingParams(), 0, blocks, computed)
        counts[req_id] = n
    return batch, SimpleNamespace(num_scheduled_tokens=counts)


@pytest.mark.parametrize("seed", range(6))
def test_few_token_and_vectorised_paths_lay_out_the_same_step(seed, monkeypatch):
    rng = random.Random(seed)
    batch, step = _batch_and_step(rng, num_seqs=rng.randint(1, 12))
    monkeypatch.setattr(input_batch, "FEW_TOKENS", 10**9)
    few = batch.prepare(step)
    monkeypatch.setattr(input_batch, "FEW_TOKENS", 0)
    vectorised = batch.prepare(step)
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                 "logits_indices"):
        a, b = getattr(few, name), getattr(vectorised, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for inputs in (few, vectorised):  # the query lengths as ints, what query_start_loc spaces out
        assert inputs.query_lens == np.diff(inputs.query_start_loc).tolist() == list(step.num_scheduled_tokens.values())
        assert all(type(n) is int for n in inputs.query_lens)
    # and what both say: each token's position follows its sequence's computed tokens, and its
    # slot is that position's place in the sequence's blocks
    row = 0
    for req_id, n in step.num_scheduled_tokens.items():
        state = batch.requests[req_id]
        for pos in range(state.num_computed_tokens, state.num_computed_tokens + n):
            assert few.positions[row] == pos
            assert few.slot_mapping[row] == state.block_ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            assert few.input_ids[row] == state.token_at(pos)
            row += 1
    assert row == len(few.input_ids)

