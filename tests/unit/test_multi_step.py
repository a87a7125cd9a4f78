"""Multi-step decoding (num_scheduler_steps > 1): a step of one-token decodes becomes k passes on
the worker. The tokens, stops and finish reasons must equal single-step scheduling, with nothing
leaked; only sequences that sample alone (logprobs) and prefill steps stay at one pass."""
import random

import pytest

from scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from scheduler.sampling_params import SamplingParams
from tests.unit.scheduler_helpers import (EOS, FakeModelRunner, add_requests, create_requests, create_scheduler,
                                          random_workload, run_overlapped, run_to_completion, step_once, tokens_of)
from workers.multi_step import split_passes


def _prefill_then_decode(scheduler, runner):
    prefill, _ = step_once(scheduler, runner)
    assert prefill.decode_steps == 1, "a step with prefill work runs one pass"
    return step_once(scheduler, runner)


def test_decodes_get_up_to_k_tokens_and_the_blocks_for_them():
    scheduler = create_scheduler(num_scheduler_steps=4, block_size=4)
    add_requests(scheduler, create_requests(2, prompt_len=6, max_tokens=20))
    runner = FakeModelRunner(scheduler.block_size)
    decode, outputs = _prefill_then_decode(scheduler, runner)
    assert decode.decode_steps == 4
    assert decode.num_scheduled_tokens == {"req0#0": 4, "req1#0": 4}
    assert decode.total_num_scheduled_tokens == 8
    # after the prefill each holds 6 + 1 tokens in 2 blocks; 4 more passes reach position 10: 3 blocks
    assert [len(b) for b in decode.scheduled_cached_reqs.new_block_ids] == [1, 1]
    assert [len(o.new_token_ids) for o in outputs] == [4, 4]
    run_to_completion(scheduler, runner)
    scheduler.block_manager.check_no_leaks()


def test_the_step_after_a_prefill_is_one_pass_until_the_first_token_is_back():
    scheduler = create_scheduler(num_scheduler_steps=4)
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=20))
    runner = FakeModelRunner(scheduler.block_size)
    prefill = scheduler.schedule()
    out_prefill = runner.execute_model(prefill)
    ahead = scheduler.schedule()  # scheduled before the prefill's token is back, as the engine does
    assert ahead.decode_steps == 1, "the replica launches it before returning the first token"
    scheduler.update_from_output(prefill, out_prefill)
    after = scheduler.schedule()
    assert after.decode_steps == 4 and after.num_scheduled_tokens == {"req0#0": 4}
    scheduler.update_from_output(ahead, runner.execute_model(ahead))
    scheduler.update_from_output(after, runner.execute_model(after))
    run_to_completion(scheduler, runner)
    scheduler.block_manager.check_no_leaks()


def test_max_tokens_caps_the_passes_and_nothing_is_computed_past_it():
    scheduler = create_scheduler(num_scheduler_steps=8)
    add_requests(scheduler, create_requests(1, prompt_len=5, max_tokens=4, id_prefix="a")
                 + create_requests(1, prompt_len=5, max_tokens=20, id_prefix="b"))
    runner = FakeModelRunner(scheduler.block_size)
    decode, outputs = _prefill_then_decode(scheduler, runner)
    assert decode.num_scheduled_tokens == {"a0#0": 3, "b0#0": 8}  # a0 sampled 1 of its 4 in the prefill
    assert decode.decode_steps == 8
    assert {o.req_id: o.finish_reason for o in outputs} == {"a0": "length", "b0": None}
    results = run_to_completion(scheduler, runner)
    assert len(results[("b0", 0)].token_ids) == 20 - 1 - 8
    scheduler.block_manager.check_no_leaks()


def test_logprobs_sequences_take_one_token_a_step():
    scheduler = create_scheduler(num_scheduler_steps=4)
    add_requests(scheduler, create_requests(1, max_tokens=10, id_prefix="plain")
                 + create_requests(1, max_tokens=10, id_prefix="lp", logprobs=2))
    decode, _ = _prefill_then_decode(scheduler, FakeModelRunner(scheduler.block_size))
    assert decode.num_scheduled_tokens == {"plain0#0": 4, "lp0#0": 1}


def test_a_stop_inside_the_passes_ends_the_sequence_there():
    def next_token(context, index):  # the third output token is EOS
        return EOS if len(context) == 8 else 500

    scheduler = create_scheduler(num_scheduler_steps=4, eos_token_ids=[EOS])
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=10))
    results = run_to_completion(scheduler, FakeModelRunner(scheduler.block_size, next_token))
    assert tokens_of(results) == {("req0", 0): [500, 500, EOS]}
    assert results[("req0", 0)].finish_reason == "stop"
    scheduler.block_manager.check_no_leaks()


def test_no_free_block_means_fewer_passes_not_a_preemption():
    scheduler = create_scheduler(num_scheduler_steps=4, block_size=4, num_gpu_blocks=4)
    add_requests(scheduler, create_requests(2, prompt_len=6, max_tokens=10))
    decode, _ = _prefill_then_decode(scheduler, FakeModelRunner(scheduler.block_size))
    # each holds 2 of the 4 blocks: 8 slots, 7 tokens computed after this step's first pass
    assert decode.num_scheduled_tokens == {"req0#0": 2, "req1#0": 2}
    assert decode.scheduled_cached_reqs.new_block_ids == [[], []]
    assert scheduler.num_preemptions == 0


def test_a_step_that_preempts_runs_one_pass():
    scheduler = create_scheduler(num_scheduler_steps=4, block_size=4, num_gpu_blocks=4)
    add_requests(scheduler, create_requests(2, prompt_len=8, max_tokens=10))
    runner = FakeModelRunner(scheduler.block_size)
    step_once(scheduler, runner)  # both prompts: all 4 blocks, full
    decode, _ = step_once(scheduler, runner)
    assert scheduler.num_preemptions == 1, "req0's next token needs req1's blocks"
    assert decode.decode_steps == 1 and decode.num_scheduled_tokens == {"req0#0": 1}
    following, _ = step_once(scheduler, runner)
    assert following.decode_steps == 4, "req1 cannot come back yet (3 blocks, 2 free): req0 runs on"
    run_to_completion(scheduler, runner)
    scheduler.block_manager.check_no_leaks()


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_match_single_step(seed):
    rng = random.Random(300 + seed)
    specs, knobs, tight_knobs = random_workload(rng, f"m{seed}-")
    single = create_scheduler(**knobs)
    add_requests(single, specs)
    expected = run_to_completion(single)
    k = rng.choice([2, 3, 4, 8])
    for run, extra in ((run_to_completion, {}), (run_overlapped, {}), (run_overlapped, tight_knobs)):
        multi = create_scheduler(**knobs, **extra, num_scheduler_steps=k)
        add_requests(multi, specs)
        results = run(multi)
        assert tokens_of(results) == tokens_of(expected), (run.__name__, extra)
        assert {key: r.finish_reason for key, r in results.items()} == \
            {key: r.finish_reason for key, r in expected.items()}
        multi.block_manager.check_no_leaks()


def test_split_passes_moves_each_sequence_one_token_a_pass():
    cached = CachedRequestData(["a", "b"], [[7], []], [10, 20])
    new = NewRequestData("c", [1, 2, 3], [], SamplingParams(), 0, [3], 2)
    step = SchedulerOutput(5, [new], cached, {"c": 1, "a": 3, "b": 2}, 6, ["gone"], decode_steps=3)
    passes = split_passes(step)
    assert [p.num_scheduled_tokens for p in passes] == [{"c": 1, "a": 1, "b": 1}, {"a": 1, "b": 1}, {"a": 1}]
    assert [p.total_num_scheduled_tokens for p in passes] == [3, 2, 1]
    assert passes[0].scheduled_new_reqs == [new] and passes[0].finished_req_ids == ["gone"]
    assert passes[0].scheduled_cached_reqs is cached, "pass 0 carries the step's diffs, blocks for every pass"
    assert passes[1].scheduled_cached_reqs.num_computed_tokens == [11, 21]
    assert passes[2].scheduled_cached_reqs.num_computed_tokens == [12]
    assert all(p.decode_steps == 1 for p in passes) and not any(p.finished_req_ids for p in passes[1:])
    assert all(not any(p.scheduled_cached_reqs.new_block_ids[1:]) for p in passes[1:])
