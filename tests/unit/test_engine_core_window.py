"""EngineCore.step's window: once a step is submitted and before one is collected, while the
device runs, the engine returns released KV blocks to the free pool and runs the caller's
while_waiting. A request's last token then waits for neither. And its before_submit, between a
collected step and the next submit: a request queued meanwhile joins that next step."""
from cluster.engine_core import EngineCore, Replica
from scheduler.sampling_params import SamplingParams
from tests.unit.scheduler_helpers import FakeModelRunner, add_requests, create_requests, create_scheduler


class _Handle:
    def __init__(self, log: list, output):
        self.log, self.output = log, output

    def result(self):
        self.log.append("result")
        return self.output


class _Executor:
    """Runs each step at submit, like the in-process executor's launch; result() only hands it over."""
    overlaps_steps = True

    def __init__(self, block_size: int, log: list):
        self.runner, self.log = FakeModelRunner(block_size), log
        self.submitted = []  # every SchedulerOutput, in submit order

    def submit(self, step):
        self.log.append("submit")
        self.submitted.append(step)
        return _Handle(self.log, self.runner.execute_model(step))

    def shutdown(self):
        pass


def _core(log: list, **overrides):
    scheduler = create_scheduler(**overrides)
    return EngineCore([Replica(0, scheduler, _Executor(scheduler.block_size, log))]), scheduler


def test_while_waiting_runs_after_the_submits_and_before_the_collect():
    log = []
    core, scheduler = _core(log)
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=3))
    core.step(lambda: log.append("while_waiting"))
    # the prefill and the decode scheduled ahead of its token go out first
    assert log[:4] == ["submit", "submit", "while_waiting", "result"]


def test_a_finished_requests_blocks_return_to_the_pool_while_the_next_step_runs():
    log = []
    core, scheduler = _core(log, num_gpu_blocks=16)
    bm = scheduler.block_manager
    prefix = list(range(100, 112))
    scheduler.add_request("a", prefix + [7], SamplingParams(max_tokens=1))
    while core.has_unfinished():
        core.step()
    # "a" finished: its 4 blocks are released, not yet back (the pool would be all 16)
    assert len(bm.free_uncached) + len(bm.free_cached) == 12 and bm._released

    pools = []
    scheduler.add_request("b", prefix + [8], SamplingParams(max_tokens=1))
    outputs = core.step(lambda: pools.append((len(bm.free_uncached) + len(bm.free_cached), list(bm._released))))
    assert outputs[0].num_cached_tokens == 12  # b took a's released full blocks as a hit
    # in the window: a's table returned; b holds a's 3 full blocks and a fresh one, a's last is free
    assert pools == [(12, [])]
    assert [o.finished for o in outputs] == [True]
    bm.check_no_leaks()


def test_a_request_added_before_submit_joins_the_next_step_submitted():
    log = []
    core, scheduler = _core(log)
    submitted = core.replicas[0].executor.submitted
    add_requests(scheduler, create_requests(1, prompt_len=6, max_tokens=8))
    core.step()  # the prefill and a decode ahead of it go out; the prefill is collected
    assert len(core.replicas[0].inflight) == 2  # a decode running and one queued behind it

    def add_late():
        log.append("before_submit")
        scheduler.add_request("late", [3, 1, 4, 1, 5], SamplingParams(max_tokens=2))

    num_before = len(submitted)
    core.step(before_submit=add_late)
    assert log[-3:] == ["result", "before_submit", "submit"]
    # the step submitted right after the collect carries the late prefill: not the one after it
    new_ids = [r.req_id for r in submitted[num_before].scheduled_new_reqs]
    assert [i.split("#")[0] for i in new_ids] == ["late"]
    while core.has_unfinished():
        core.step()
    scheduler.block_manager.return_released()
    scheduler.block_manager.check_no_leaks()
