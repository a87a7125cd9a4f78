import random

import pytest

from scheduler.errors import InvalidRequestError, QueueFullError
from scheduler.output import ModelRunnerOutput, TokenLogprobs
from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from tests.unit.scheduler_helpers import (EOS, FakeModelRunner, add_requests, create_requests, create_scheduler,
                                          default_next_token, random_workload, run_steps, run_to_completion,
                                          step_once, tokens_of)


# ---- admission -----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len,message", [
    (0, "prompt_token_ids: must not be empty"),
    (100, "prompt_token_ids: the prompt has 100 tokens, longer than max_model_len 64"),
    (17, "prompt_token_ids: the prompt has 17 tokens and needs 5 KV blocks; the whole cache has 4"),
])
def test_bad_prompt_rejected(prompt_len, message):
    s = create_scheduler(max_model_len=64, num_gpu_blocks=4)
    with pytest.raises(InvalidRequestError) as info:
        s.add_request("r", list(range(10, 10 + prompt_len)), SamplingParams())
    assert info.value.field == "prompt_token_ids" and str(info.value) == message
    assert not s.has_unfinished_requests()
    s.block_manager.check_no_leaks()


def test_duplicate_id_bad_params_and_queue_full():
    s = create_scheduler(max_queued_requests=2)
    add_requests(s, create_requests(2))
    with pytest.raises(InvalidRequestError, match="req0") as info:
        s.add_request("req0", [10, 11], SamplingParams())
    assert info.value.field == "request_id"
    with pytest.raises(InvalidRequestError) as info:
        s.add_request("x", [10], {"max_tokens": 3})
    assert info.value.field == "sampling_params"
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        s.add_request("x", [10, 11], SamplingParams())
    run_to_completion(s)
    s.add_request("req0", [10, 11], SamplingParams(max_tokens=2))  # a finished id may be reused
    run_to_completion(s)
    s.block_manager.check_no_leaks()


def test_chunking_off_needs_budget_of_max_model_len():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(32\) must be >= max_model_len \(64\)"):
        create_scheduler(enable_chunked_prefill=False, max_num_batched_tokens=32, max_model_len=64)


# ---- budget and chunking -----------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [True, False])
def test_budget_and_max_num_seqs_respected_every_step(chunked):
    s = create_scheduler(max_num_batched_tokens=40, max_num_seqs=5, enable_chunked_prefill=chunked,
                         max_model_len=40)
    specs = [spec for i, n in enumerate([3, 30, 7, 12, 25, 1, 18, 9]) for spec in
             create_requests(1, prompt_len=n, max_tokens=3 + i, start=i)]
    add_requests(s, specs)
    runner, results = FakeModelRunner(), {}
    while s.has_unfinished_requests():
        step, _ = step_once(s, runner, results)
        assert step.total_num_scheduled_tokens <= 40 and len(step.num_scheduled_tokens) <= 5
    assert {k[0]: len(r.token_ids) for k, r in results.items()} == {x.req_id: 3 + i for i, x in enumerate(specs)}
    s.block_manager.check_no_leaks()


def test_long_prompt_chunked_over_several_steps():
    s = create_scheduler(max_num_batched_tokens=16)
    add_requests(s, create_requests(1, prompt_len=50, max_tokens=3))
    runner, chunks, outputs = FakeModelRunner(), [], []
    for _ in range(6):
        step, outs = step_once(s, runner)
        chunks.append(step.num_scheduled_tokens.get("req0#0", 0))
        outputs.append([len(o.new_token_ids) for o in outs])
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert outputs == [[], [], [], [1], [1], [1]]  # partial prefills sample nothing
    assert not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == ["req0#0"]  # dropped on the replica in the next step
    s.block_manager.check_no_leaks()


def test_without_chunking_a_prompt_that_does_not_fit_waits():
    s = create_scheduler(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    for i, n in enumerate([20, 14, 5]):
        add_requests(s, create_requests(1, prompt_len=n, max_tokens=4, start=i))
    runner = FakeModelRunner()
    step, _ = step_once(s, runner)
    assert step.num_scheduled_tokens == {"req0#0": 20}  # req1 waits whole, and req2 may not overtake it
    step, _ = step_once(s, runner)
    assert step.num_scheduled_tokens == {"req0#0": 1, "req1#0": 14, "req2#0": 5}
    run_to_completion(s, runner)
    s.block_manager.check_no_leaks()


def test_step_contract_diffs():
    s = create_scheduler(block_size=4)
    add_requests(s, create_requests(1, prompt_len=6, max_tokens=5))
    runner = FakeModelRunner()
    (new,) = step_once(s, runner)[0].scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens, len(new.block_ids), new.output_token_ids) == ("req0#0", 0, 2, [])
    cached = [step_once(s, runner)[0].scheduled_cached_reqs for _ in range(3)]
    assert [c.req_ids for c in cached] == [["req0#0"]] * 3
    assert [c.num_computed_tokens for c in cached] == [[6], [7], [8]]
    assert [len(c.new_block_ids[0]) for c in cached] == [0, 0, 1]  # position 8 opens a third block
    run_to_completion(s, runner)
    s.block_manager.check_no_leaks()


# ---- prefix caching ------------------------------------------------------------------------
def test_prefix_cache_hit_skips_shared_prefix():
    s = create_scheduler(block_size=4)
    prefix = list(range(500, 518))  # 18 tokens: 4 full blocks
    add_requests(s, create_requests(1, prompt_len=24, max_tokens=4, prefix=prefix))
    runner = FakeModelRunner()
    results = run_to_completion(s, runner)
    assert s.get_stats().prefix_cache_hits == 0
    add_requests(s, create_requests(1, prompt_len=22, max_tokens=4, prefix=prefix, start=1))
    step, _ = step_once(s, runner, results)
    assert step.scheduled_new_reqs[0].num_computed_tokens == 16 and step.num_scheduled_tokens == {"req1#0": 6}
    run_to_completion(s, runner, results=results)
    stats = s.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (24 + 22, 16)
    assert stats.prefix_cache_hit_rate == pytest.approx(16 / 46) and results[("req1", 0)].num_cached_tokens == 16
    uncached = create_scheduler(enable_prefix_caching=False)
    add_requests(uncached, create_requests(1, prompt_len=22, max_tokens=4, prefix=prefix, start=1))
    assert run_to_completion(uncached)[("req1", 0)].token_ids == results[("req1", 0)].token_ids
    s.block_manager.check_no_leaks()
    uncached.block_manager.check_no_leaks()


def test_identical_prompt_recomputes_last_block():
    s = create_scheduler(block_size=4)
    spec = create_requests(1, prompt_len=12, max_tokens=2)[0]
    runner, second = FakeModelRunner(), {}
    s.add_request("a", spec.prompt_token_ids, spec.sampling_params)
    first = run_to_completion(s, runner)
    s.add_request("b", spec.prompt_token_ids, spec.sampling_params)
    step, _ = step_once(s, runner, second)
    assert step.scheduled_new_reqs[0].num_computed_tokens == 8 and step.num_scheduled_tokens == {"b#0": 4}
    run_to_completion(s, runner, results=second)
    assert first[("a", 0)].token_ids == second[("b", 0)].token_ids
    s.block_manager.check_no_leaks()


def test_lru_eviction_and_placement_probe():
    s = create_scheduler(block_size=4, num_gpu_blocks=8)
    a, b, c = (create_requests(1, prompt_len=n, max_tokens=1, start=i)[0] for i, n in enumerate([9, 9, 21]))
    runner = FakeModelRunner()
    for spec in (a, b):
        add_requests(s, [spec])
        run_to_completion(s, runner)
    assert s.num_cached_prefix_tokens(a.prompt_token_ids) == 8 == s.num_cached_prefix_tokens(b.prompt_token_ids)
    order = list(s.block_manager.free_cached)
    assert s.num_cached_prefix_tokens(a.prompt_token_ids + [1, 2, 3]) == 8
    assert list(s.block_manager.free_cached) == order  # probing changes no LRU state
    add_requests(s, [c])  # needs 6 blocks: the 4 never cached, then a's (least recently freed)
    run_to_completion(s, runner)
    assert s.num_cached_prefix_tokens(a.prompt_token_ids) == 0
    assert s.num_cached_prefix_tokens(b.prompt_token_ids) == 8
    s.block_manager.check_no_leaks()


# ---- preemption ----------------------------------------------------------------------------
def mixed_workload():
    return (create_requests(6, prompt_len=10, max_tokens=14)
            + create_requests(3, prompt_len=23, max_tokens=9, id_prefix="long")
            + create_requests(2, prompt_len=7, max_tokens=12, n=3, id_prefix="multi"))


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_under_tiny_cache_gives_same_tokens(caching, chunked):
    knobs = dict(enable_prefix_caching=caching, enable_chunked_prefill=chunked, max_model_len=48)
    roomy = create_scheduler(**knobs)
    add_requests(roomy, mixed_workload())
    expected = run_to_completion(roomy)
    assert roomy.get_stats().num_preemptions == 0
    tight = create_scheduler(num_gpu_blocks=12, **knobs)
    add_requests(tight, mixed_workload())
    runner, results, resent = FakeModelRunner(), {}, []
    while tight.has_unfinished_requests():
        step, _ = step_once(tight, runner, results)
        resent += [new for new in step.scheduled_new_reqs if new.output_token_ids]
    assert tight.get_stats().num_preemptions > 0 and resent  # resumed with their output tokens
    assert tokens_of(results) == tokens_of(expected)
    assert all(r.finish_reason == "length" for r in results.values())
    tight.block_manager.check_no_leaks()
    roomy.block_manager.check_no_leaks()


@pytest.mark.parametrize("policy,priorities,victim", [
    ("fcfs", [0, 0, 0], "r2#0"),  # the latest arrival
    ("priority", [5, 0, 1], "r0#0"),  # the earliest arrival, but the lowest priority
])
def test_preemption_victim(policy, priorities, victim):
    s = create_scheduler(policy=policy, block_size=4, num_gpu_blocks=6, max_model_len=24)
    for i, priority in enumerate(priorities):
        s.add_request(f"r{i}", list(range(10 + i, 18 + i)), SamplingParams(max_tokens=8), priority)
    runner = FakeModelRunner()
    step_once(s, runner)  # 3 x 2 blocks: the cache is full
    step, _ = step_once(s, runner)  # the first to decode needs a third block
    assert step.finished_req_ids == [victim] and victim not in step.num_scheduled_tokens
    (seq,) = list(s.waiting)
    assert seq.seq_id == victim and seq.status is RequestStatus.PREEMPTED
    assert seq.block_ids == [] and seq.num_computed_tokens == 0 and seq.num_output_tokens == 1
    run_to_completion(s, runner)
    assert s.get_stats().num_preemptions >= 1
    s.block_manager.check_no_leaks()


# ---- abort, stop strings -------------------------------------------------------------------------
def test_abort_frees_blocks_and_reports():
    s = create_scheduler(max_num_seqs=2)
    add_requests(s, create_requests(3, prompt_len=9, max_tokens=20, n=2))
    runner = FakeModelRunner()
    run_steps(s, runner, 3)
    stats = s.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (2, 4, 6 / 256)
    outs = s.abort_requests(["req0", "req2", "unknown"])  # req0 running, req2 still queued
    assert sorted((o.req_id, o.index, o.finish_reason) for o in outs) == [
        ("req0", 0, "abort"), ("req0", 1, "abort"), ("req2", 0, "abort"), ("req2", 1, "abort")]
    assert all(o.finished and o.new_token_ids == [] for o in outs)
    assert s.get_stats().kv_cache_usage == 3 / 256 and not s.has_request("req0")
    assert s.abort_requests("req0") == []
    step, _ = step_once(s, runner)
    # req0#1 waited for a seat (max_num_seqs) and req2 was queued: neither reached the replica
    assert step.finished_req_ids == ["req0#0"]
    assert set(run_to_completion(s, runner)) == {("req1", 0), ("req1", 1)}
    s.block_manager.check_no_leaks()


def test_outputs_of_sequences_gone_mid_step_are_dropped():
    s = create_scheduler()
    add_requests(s, create_requests(2, prompt_len=5, max_tokens=3))
    runner = FakeModelRunner()
    step = s.schedule()
    s.abort_requests(["req0"])
    outs = s.update_from_output(step, runner.execute_model(step))
    assert [(o.req_id, len(o.new_token_ids)) for o in outs] == [("req1", 1)]
    assert step_once(s, runner)[0].finished_req_ids == ["req0#0"]
    run_to_completion(s, runner)
    s.block_manager.check_no_leaks()


def test_finish_request_stops_one_sibling():
    s = create_scheduler()
    add_requests(s, create_requests(1, prompt_len=9, max_tokens=10, n=2))
    runner = FakeModelRunner()
    results = run_steps(s, runner, 3)
    s.finish_request("req0", 1, "###")
    s.finish_request("req0", 1, "again")  # already finished: no-op
    s.finish_request("nope", 0, "x")
    seq = s.requests["req0"].seqs[1]
    assert seq.status is RequestStatus.FINISHED_STOPPED and seq.stop_reason == "###" and seq.block_ids == []
    run_to_completion(s, runner, results=results)
    assert results[("req0", 0)].finish_reason == "length" and len(results[("req0", 0)].token_ids) == 10
    assert len(results[("req0", 1)].token_ids) < 10 and results[("req0", 1)].finish_reason is None
    s.block_manager.check_no_leaks()


# ---- ordering --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,expected", [("fcfs", ["a", "b", "c", "d"]), ("priority", ["c", "a", "d", "b"])])
def test_admission_order(policy, expected):
    s = create_scheduler(policy=policy, max_num_seqs=1)
    for req_id, priority, arrival in [("a", 1, 1.0), ("b", 5, 2.0), ("c", 0, 3.0), ("d", 1, 4.0)]:
        s.add_request(req_id, [10, 11, 12], SamplingParams(max_tokens=2), priority, arrival)
    runner, order = FakeModelRunner(), []
    while s.has_unfinished_requests():
        order += [new.req_id.split("#")[0] for new in step_once(s, runner)[0].scheduled_new_reqs]
    assert order == expected
    s.block_manager.check_no_leaks()


# ---- n > 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_siblings_share_prompt_blocks_and_finish_independently(caching):
    def next_token(context, index):  # sibling 1 emits EOS as its third token
        return EOS if index == 1 and len(context) == 13 + 2 else default_next_token(context, index)

    s = create_scheduler(block_size=4, enable_prefix_caching=caching)
    add_requests(s, create_requests(1, prompt_len=13, max_tokens=6, n=3))
    runner, results = FakeModelRunner(next_token=next_token), {}
    step, _ = step_once(s, runner, results)
    assert [n.req_id for n in step.scheduled_new_reqs] == ["req0#0"]  # the first sibling prefills alone
    step, _ = step_once(s, runner, results)
    first = s.requests["req0"].seqs[0]
    assert [n.req_id for n in step.scheduled_new_reqs] == ["req0#1", "req0#2"]
    for new in step.scheduled_new_reqs:  # 3 full prompt blocks forked, the partial tail computed
        assert new.block_ids[:3] == first.block_ids[:3] and new.num_computed_tokens == 12
        assert step.num_scheduled_tokens[new.req_id] == 1
    assert [s.block_manager.ref_counts[b] for b in first.block_ids] == [3, 3, 3, 1]
    run_to_completion(s, runner, results=results)
    assert [results[("req0", i)].finish_reason for i in range(3)] == ["length", "stop", "length"]
    assert len(results[("req0", 1)].token_ids) == 3 and results[("req0", 1)].token_ids[-1] == EOS
    assert results[("req0", 0)].token_ids != results[("req0", 2)].token_ids  # seeded apart by index
    assert results[("req0", 2)].num_cached_tokens == 12
    s.block_manager.check_no_leaks()


def test_siblings_start_when_first_finishes_at_once():
    s = create_scheduler(block_size=4, enable_prefix_caching=False)
    s.add_request("r", list(range(10, 26)), SamplingParams(n=2, max_tokens=1))  # prompt ends on a block edge
    runner, results = FakeModelRunner(), {}
    step_once(s, runner, results)
    assert results[("r", 0)].finish_reason == "length"
    step, _ = step_once(s, runner, results)
    (new,) = step.scheduled_new_reqs
    assert new.num_computed_tokens == 12 and step.num_scheduled_tokens == {"r#1": 4}
    assert step.finished_req_ids == ["r#0"]
    run_to_completion(s, runner, results=results)
    assert results[("r", 0)].token_ids != results[("r", 1)].token_ids
    s.block_manager.check_no_leaks()


def test_first_sibling_stopped_before_prompt_releases_the_others():
    s = create_scheduler(max_num_seqs=1)
    add_requests(s, create_requests(1, prompt_len=6, max_tokens=2))
    add_requests(s, create_requests(1, prompt_len=6, max_tokens=2, n=2, start=1))
    runner = FakeModelRunner()
    step_once(s, runner)
    s.finish_request("req1", 0, "client stop")  # still queued: never computed anything
    results = run_to_completion(s, runner)
    assert set(results) == {("req0", 0), ("req1", 1)} and results[("req1", 1)].num_cached_tokens == 0
    s.block_manager.check_no_leaks()


# ---- stop conditions --------------------------------------------------------------------------------
def eos_at(position):
    return lambda context, index: EOS if len(context) == position else default_next_token(context, index)


@pytest.mark.parametrize("params,next_token,expected", [
    (dict(max_tokens=5), default_next_token, (5, "length", None)),
    (dict(max_tokens=None), default_next_token, (32 - 8, "length", None)),  # max_model_len 32
    (dict(max_tokens=20), eos_at(8 + 3), (4, "stop", None)),
    (dict(max_tokens=20, ignore_eos=True), eos_at(8 + 3), (20, "length", None)),
    (dict(max_tokens=20, min_tokens=6), eos_at(8 + 3), (20, "length", None)),
    (dict(max_tokens=20, min_tokens=4), eos_at(8 + 3), (4, "stop", None)),
    (dict(max_tokens=20, stop_token_ids=[7]), lambda c, i: 7 if len(c) == 10 else 12, (3, "stop", 7)),
    (dict(max_tokens=20, stop_token_ids=[7], ignore_eos=True, min_tokens=5),
     lambda c, i: 7 if len(c) in (10, 13) else 12, (6, "stop", 7)),
])
def test_stop_conditions(params, next_token, expected):
    s = create_scheduler(max_model_len=32)
    s.add_request("r", list(range(10, 18)), SamplingParams(**params))
    result = run_to_completion(s, FakeModelRunner(next_token=next_token))[("r", 0)]
    assert (len(result.token_ids), result.finish_reason, result.stop_reason) == expected
    s.block_manager.check_no_leaks()


@pytest.mark.parametrize("limits", [dict(max_model_len=16), dict(max_model_len=64, num_gpu_blocks=4)])
def test_prompt_filling_the_context_or_the_cache_gets_one_token(limits):
    s = create_scheduler(**limits)
    s.add_request("r", list(range(10, 26)), SamplingParams(max_tokens=None))
    result = run_to_completion(s)[("r", 0)]
    assert (len(result.token_ids), result.finish_reason) == (1, "length")
    s.block_manager.check_no_leaks()


def test_logprobs_pass_through():
    s = create_scheduler()
    s.add_request("r", [10, 11, 12], SamplingParams(max_tokens=1, logprobs=1))
    step = s.schedule()
    lp = TokenLogprobs(-0.5, [42], [-0.5])
    (out,) = s.update_from_output(step, ModelRunnerOutput(["r#0"], [[42]], [lp]))
    assert (out.new_token_ids, out.new_logprobs, out.finish_reason) == ([42], [lp], "length")
    assert (out.num_prompt_tokens, out.num_cached_tokens, out.index, out.req_id) == (3, 0, 0, "r")
    s.block_manager.check_no_leaks()


# ---- data parallel: drain and resume -----------------------------------------------------------------
def test_drain_and_resume_elsewhere():
    def workload():
        return (create_requests(4, prompt_len=11, max_tokens=12)
                + create_requests(1, prompt_len=9, max_tokens=10, n=3, id_prefix="multi")
                + create_requests(1, prompt_len=9, max_tokens=10, n=2, id_prefix="late"))

    reference = create_scheduler()
    add_requests(reference, workload())
    expected = run_to_completion(reference)
    dead = create_scheduler(max_num_seqs=4)
    add_requests(dead, workload())
    results = run_steps(dead, FakeModelRunner(), 4)
    dead.finish_request("multi0", 2, "stop!")  # a finished sibling stays finished
    drained = dead.drain_requests()
    assert not dead.has_unfinished_requests() and dead.get_stats().num_running == 0
    assert len(dead.schedule().finished_req_ids) == 4  # the dead replica's state is dropped
    dead.block_manager.check_no_leaks()

    live = create_scheduler()
    for request in drained:
        live.add_resumed(request)
    with pytest.raises(InvalidRequestError):
        live.add_resumed(drained[0])
    run_to_completion(live, results=results)
    for key, result in expected.items():
        done = results[key].token_ids if key in results else []
        assert done == (result.token_ids[:len(done)] if key == ("multi0", 2) else result.token_ids), key
    live.block_manager.check_no_leaks()


# ---- everything at once ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_random_workloads_match_an_uncontended_run(seed):
    specs, knobs, tight_knobs = random_workload(random.Random(seed), f"s{seed}-")
    roomy = create_scheduler(**knobs)
    add_requests(roomy, specs)
    expected = run_to_completion(roomy)
    tight = create_scheduler(**knobs, **tight_knobs)
    add_requests(tight, specs)
    results = run_to_completion(tight)
    assert tokens_of(results) == tokens_of(expected)
    assert {k: r.finish_reason for k, r in results.items()} == {k: r.finish_reason for k, r in expected.items()}
    roomy.block_manager.check_no_leaks()
    tight.block_manager.check_no_leaks()
