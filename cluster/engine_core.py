"""EngineCore: the step loop over one or more replicas, each a Scheduler plus an executor.

The in-process engine runs it directly; the Ray SchedulerActor hosts the same object with Ray
executors. One iteration = one forward pass on every replica, all replicas stepping at once.
"""
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from scheduler.errors import EngineDeadError, InvalidRequestError
from scheduler.output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


class StepHandle(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class Executor(Protocol):
    """Runs one replica's steps: in-process, or on its Ray worker actors.

    overlaps_steps: submit returns at once and steps run in submission order, so the engine may
    schedule and submit step N+1 before collecting step N (an in-process executor runs the step
    inside submit, where scheduling ahead would only waste tokens).
    """

    overlaps_steps: bool

    def submit(self, step: SchedulerOutput) -> StepHandle: ...

    def shutdown(self) -> None: ...


class ReplicaDiedError(RuntimeError):
    """An executor lost a worker; the replica's sequences must move elsewhere."""


@dataclass
class Replica:
    replica_id: int
    scheduler: Scheduler
    executor: Executor | None
    restarts: int = 0
    inflight: deque = field(default_factory=deque)  # (SchedulerOutput, StepHandle), oldest first

    @property
    def live(self) -> bool:
        return self.executor is not None


@dataclass
class _Placement:
    replica_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int


@dataclass
class EngineCore:
    replicas: list[Replica]
    async_scheduling: bool = True  # keep a step in flight on executors that overlap steps
    placements: dict[str, int] = field(default_factory=dict)  # request id -> replica id
    pending: list = field(default_factory=list)  # drained work waiting for a live replica

    def add_request(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    packed_prompt: bytes | None = None) -> None:
        """packed_prompt: as Scheduler.add_request takes it."""
        if req_id in self.placements:
            raise InvalidRequestError("request_id", f"{req_id!r} is already running; ids must be unique")
        replica = self._place(prompt_token_ids)
        replica.scheduler.add_request(req_id, prompt_token_ids, sampling_params, priority, arrival_time,
                                      packed_prompt)
        self.placements[req_id] = replica.replica_id

    def add_requests(self, requests: list[tuple]) -> None:
        """add_request(*r) for each r, all or none: a refused one aborts those added before it."""
        added = []
        try:
            for r in requests:
                self.add_request(*r)
                added.append(r[0])
        except Exception:
            for req_id in added:
                self.abort(req_id)
            raise

    def _place(self, prompt_token_ids: list[int]) -> Replica:
        """Most prefix-cache hits first, then least loaded; dead replicas still queue work."""
        candidates = [r for r in self.replicas if r.live] or self.replicas
        if len(candidates) == 1:
            return candidates[0]

        def score(r: Replica):
            stats = r.scheduler.get_stats()
            return (r.scheduler.num_cached_prefix_tokens(prompt_token_ids),
                    -(stats.num_running + stats.num_waiting))

        return max(candidates, key=score)

    def abort(self, req_id: str) -> list[EngineCoreOutput]:
        """Abort now, blocks freed; returns the final "abort" outputs of its unfinished siblings."""
        replica_id = self.placements.pop(req_id, None)
        if replica_id is None:
            return []
        return self.replicas[replica_id].scheduler.abort_requests([req_id])

    def finish(self, req_id: str, index: int, stop_reason: str) -> None:
        replica_id = self.placements.get(req_id)
        if replica_id is not None:
            self.replicas[replica_id].scheduler.finish_request(req_id, index, stop_reason)
            if self._all_finished(req_id):  # no output follows a frontend stop: release the id here
                self.placements.pop(req_id, None)

    def has_unfinished(self) -> bool:
        return any(r.scheduler.has_unfinished_requests() or r.inflight for r in self.replicas)

    def step(self, while_waiting: Callable[[], None] | None = None,
             before_submit: Callable[[], None] | None = None) -> list[EngineCoreOutput]:
        """Submit the next step of every live replica, then collect each one's oldest step.

        Replicas that overlap steps keep one step in flight while the previous one is collected,
        so scheduling and output handling hide behind the device; all replicas step concurrently.
        Between the two, while the device runs, come the host chores that no step waits for: the
        released KV blocks go back to each free pool, then while_waiting() (the caller's own).
        before_submit() runs after each collected step's outputs are applied and before that
        replica's next step is scheduled: a caller that queues requests while a step runs adds them
        there, so that they join that step rather than the one after it.
        """
        if not any(r.live for r in self.replicas):
            raise EngineDeadError("no replica is live")
        for replica in self.replicas:
            self._submit_ahead(replica)
        for replica in self.replicas:
            replica.scheduler.return_released_blocks()
        if while_waiting is not None:
            while_waiting()
        outputs: list[EngineCoreOutput] = []
        for replica in self.replicas:
            if not replica.inflight:
                continue
            step, handle = replica.inflight.popleft()
            try:
                result = handle.result()
            except ReplicaDiedError:
                logger.exception("replica %d lost a worker; moving its sequences", replica.replica_id)
                self.mark_dead(replica)
                continue
            outputs.extend(replica.scheduler.update_from_output(step, result))
            if before_submit is not None:
                before_submit()
            # its next step goes out now, not after the other replicas' updates: each replica's
            # device waits on its own host work only
            self._submit_ahead(replica)
        for out in outputs:
            if out.finished and self._all_finished(out.req_id):
                self.placements.pop(out.req_id, None)
        return outputs

    def _submit_ahead(self, replica: Replica) -> None:
        """Schedule and submit until the replica has its steps in flight (2 where they overlap)."""
        depth = 2 if replica.live and self.async_scheduling and replica.executor.overlaps_steps else 1
        while replica.live and len(replica.inflight) < depth and replica.scheduler.has_unfinished_requests():
            step = replica.scheduler.schedule()
            if step.is_empty:
                break
            replica.inflight.append((step, replica.executor.submit(step)))

    def _all_finished(self, req_id: str) -> bool:
        replica_id = self.placements.get(req_id)
        return replica_id is None or not self.replicas[replica_id].scheduler.has_request(req_id)

    def mark_dead(self, replica: Replica) -> None:
        """A dead worker is a preemption: drain the replica and requeue its work on live ones."""
        if replica.executor is not None:
            replica.executor.shutdown()
        replica.executor = None
        replica.inflight.clear()  # their sequences are drained below and recomputed elsewhere
        drained = replica.scheduler.drain_requests()
        live = [r for r in self.replicas if r.live]
        for group in drained:
            target = self._place(group.prompt_token_ids) if live else replica
            target.scheduler.add_resumed(group)
            self.placements[group.req_id] = target.replica_id

    def revive(self, replica: Replica, executor: Executor, scheduler: Scheduler) -> None:
        """A restarted replica rejoins with an empty cache; work queued on it while dead moves there."""
        waiting = replica.scheduler.drain_requests()
        replica.scheduler, replica.executor = scheduler, executor
        replica.restarts += 1
        for group in waiting:
            scheduler.add_resumed(group)
