"""RayExecutor's step bookkeeping against fake workers (no Ray started): workers answer each call
with the previous step's output, and every handle must still get its own step's output."""
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from cluster import ray_executor  # noqa: E402
from cluster.engine_core import ReplicaDiedError  # noqa: E402
from cluster.ray_executor import RayExecutor  # noqa: E402
from scheduler.output import CachedRequestData, SchedulerOutput  # noqa: E402
from workers.worker_actor import NoopWorkerActor  # noqa: E402


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)  # the reply itself stands in for its object ref


class FakeWorker:
    """A NoopWorkerActor called in place: it pipelines like the real one and logs its calls."""

    def __init__(self, rank: int, calls: list):
        self.actor = NoopWorkerActor(SimpleNamespace(device="cpu", num_threads=None), rank, 2)
        self.dead = False

        def execute(step):
            if self.dead:
                raise ActorDiedError()
            if rank == 0:
                calls.append(None if step is None else step.step_id)
            return self.actor.execute_model(step)
        self.execute_model = _Method(execute)


def step(step_id: int, *req_ids: str) -> SchedulerOutput:
    ids = list(req_ids)
    return SchedulerOutput(step_id, [], CachedRequestData(ids, [[] for _ in ids], [0] * len(ids)),
                           {r: 1 for r in ids}, len(ids))


@pytest.fixture
def executor(monkeypatch):
    calls, reads = [], []
    monkeypatch.setattr(ray_executor.ray, "get", lambda refs, **kw: reads.append(refs) or refs)
    ex = RayExecutor([FakeWorker(0, calls), FakeWorker(1, calls)], use_compiled_graph=False)
    ex.reads = reads
    return ex, calls


def test_each_handle_gets_its_own_steps_output(executor):
    ex, calls = executor
    a, b = ex.submit(step(1, "a")), ex.submit(step(2, "b"))
    assert a.result().req_ids == ["a"]  # the reply to step 2's call
    assert b.result().req_ids == ["b"]  # nothing submitted after it: a collect-only call
    assert b.result().req_ids == ["b"]  # asked twice, read once
    assert len(ex.reads) == 3  # step 1's call's reply (nothing before it), a's and b's
    c = ex.submit(step(3, "c"))  # its call's reply carries no output: read first, then dropped
    d = ex.submit(step(4, "d"))
    assert (c.result().req_ids, d.result().req_ids) == (["c"], ["d"])
    assert calls == [1, 2, None, 3, 4, None]
    assert len(ex.reads) == 6  # and step 3's call's reply (nothing waiting before it), c's and d's


def test_a_lost_worker_fails_every_step_in_flight_and_later_ones(executor):
    ex, _ = executor
    a = ex.submit(step(1, "a"))
    ex.workers[1].dead = True
    b = ex.submit(step(2, "b"))
    for handle in (a, b):
        with pytest.raises(ReplicaDiedError):
            handle.result()
    assert ex.broken
    with pytest.raises(ReplicaDiedError):
        ex.submit(step(3, "c")).result()
