"""Scheduling one step ahead: step N+1 is scheduled before step N's tokens are back (the Ray
engine overlaps them). Outputs must equal the step-by-step run, with nothing leaked or emitted
past a stop."""
import random

import pytest

from scheduler.sampling_params import SamplingParams
from tests.unit.scheduler_helpers import (EOS, FakeModelRunner, add_requests, collect, create_requests,
                                          create_scheduler, random_workload, run_overlapped, run_to_completion,
                                          tokens_of)


def test_a_decode_is_scheduled_again_before_its_token_is_back():
    scheduler = create_scheduler()
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=5))
    runner = FakeModelRunner(scheduler.block_size)
    first = scheduler.schedule()  # the prefill: it samples the first token
    out_first = runner.execute_model(first)
    ahead = scheduler.schedule()  # before update: the decode of the token still in flight
    assert ahead.num_scheduled_tokens == {"req0#0": 1}
    assert ahead.scheduled_cached_reqs.num_computed_tokens == [6]
    out_ahead = runner.execute_model(ahead)  # the replica feeds in the token it sampled itself
    outputs = scheduler.update_from_output(first, out_first) + scheduler.update_from_output(ahead, out_ahead)
    assert [o.new_token_ids for o in outputs] == [out_first.sampled_token_ids[0], out_ahead.sampled_token_ids[0]]


def test_the_last_token_in_flight_is_not_followed():
    scheduler = create_scheduler()
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=1))
    runner = FakeModelRunner(scheduler.block_size)
    first = scheduler.schedule()
    runner.execute_model(first)
    assert scheduler.schedule().is_empty, "max_tokens is reached by the step in flight: nothing to add"


def test_tokens_after_a_stop_are_computed_but_never_emitted():
    def next_token(context, index):  # the second output token is EOS
        return EOS if len(context) == 7 else 500

    scheduler = create_scheduler(eos_token_ids=[EOS])
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=10))
    results = run_overlapped(scheduler, FakeModelRunner(scheduler.block_size, next_token))
    assert tokens_of(results) == {("req0", 0): [500, EOS]}
    assert results[("req0", 0)].finish_reason == "stop"
    scheduler.block_manager.check_no_leaks()


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_overlapped_match_step_by_step(seed):
    specs, knobs, tight_knobs = random_workload(random.Random(100 + seed), f"o{seed}-")
    roomy = create_scheduler(**knobs)
    add_requests(roomy, specs)
    expected = run_to_completion(roomy)
    # tight enough to preempt sequences whose samples are in flight
    tight = create_scheduler(**knobs, **tight_knobs)
    add_requests(tight, specs)
    results = run_overlapped(tight)
    assert tokens_of(results) == tokens_of(expected)
    assert {k: r.finish_reason for k, r in results.items()} == {k: r.finish_reason for k, r in expected.items()}
    tight.block_manager.check_no_leaks()


def test_aborts_and_stop_strings_while_a_step_is_in_flight_leak_nothing():
    rng = random.Random(5)
    scheduler = create_scheduler(num_gpu_blocks=40, max_num_seqs=4)
    specs = create_requests(12, prompt_len=10, max_tokens=15, n=2)
    add_requests(scheduler, specs)

    results, stopped = {}, set()

    def meddle(n, s):
        live = list(s.requests)
        if live and rng.random() < 0.2:
            collect(results, s.abort_requests(rng.choice(live)))
        elif live and rng.random() < 0.2:
            req_id, index = rng.choice(live), rng.randint(0, 1)
            if not s.requests[req_id].seqs[index].is_finished:
                s.finish_request(req_id, index, "stop-string")  # the frontend ends that sibling itself
                stopped.add((req_id, index))

    run_overlapped(scheduler, results=results, on_step=meddle)
    assert stopped and any(r.finish_reason == "abort" for r in results.values())
    assert all(r.finish_reason is not None for k, r in results.items() if k not in stopped)
    assert not scheduler.has_unfinished_requests()
    scheduler.block_manager.check_no_leaks()


def test_seeded_tokens_do_not_depend_on_overlap():
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8)
    a, b = create_scheduler(), create_scheduler()
    for s in (a, b):
        s.add_request("r", list(range(20, 30)), params)
    assert tokens_of(run_overlapped(a)) == tokens_of(run_to_completion(b))


def test_a_reused_id_never_receives_the_finished_sequences_token_in_flight():
    def next_token(context, index):  # the first request stops on EOS right away
        return EOS if context[0] == 11 else 500 + len(context)

    scheduler = create_scheduler(eos_token_ids=[EOS])
    runner = FakeModelRunner(scheduler.block_size, next_token)
    scheduler.add_request("x", [11] * 6, SamplingParams(max_tokens=5))
    first = scheduler.schedule()
    out_first = runner.execute_model(first)
    ahead = scheduler.schedule()  # the decode after the (EOS) token in flight
    out_ahead = runner.execute_model(ahead)
    assert scheduler.update_from_output(first, out_first)[0].finish_reason == "stop"
    scheduler.add_request("x", [12] * 6, SamplingParams(max_tokens=3))  # the caller reuses the id
    reused = scheduler.schedule()
    out_reused = runner.execute_model(reused)
    assert scheduler.update_from_output(ahead, out_ahead) == [], "the old sequence's step must not leak in"
    outputs = scheduler.update_from_output(reused, out_reused)
    assert [o.new_token_ids for o in outputs] == [[500 + 6]]
    results = run_overlapped(scheduler, runner)
    assert results[("x", 0)].token_ids == [500 + 7, 500 + 8]
    scheduler.block_manager.check_no_leaks()
