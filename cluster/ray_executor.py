"""RayExecutor: runs one replica's steps on its WorkerActors (tp_size of them).

Two step paths, same contract (every rank gets the step, rank 0's output is the result):
- a Ray compiled graph (one InputNode fanned out to every rank): ~0.1-0.4 ms a round trip;
- plain actor calls: ~1-2 ms. The fallback where compiling fails, or FOLOVLLM_COMPILED_GRAPH=0.

Any lost worker surfaces as engine_core.ReplicaDiedError from StepHandle.result(); the EngineCore
then drains the replica, and the SchedulerActor restarts it.
"""
import logging
import os
import threading

import ray
from ray.exceptions import RayActorError, RayChannelError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.engine_core import ReplicaDiedError
from scheduler.output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# What a dead or unreachable worker looks like from the caller's side (ActorDiedError and
# ActorUnavailableError are RayActorErrors; a compiled graph reports a dead peer as a channel error).
WORKER_LOST_ERRORS = (RayActorError, RayChannelError)
CTRL_GROUP = "ctrl"  # the WorkerActor concurrency group that answers pings while a step runs


def compiled_graph_enabled(requested: bool | None = None) -> bool:
    if requested is not None:
        return requested
    return os.environ.get("FOLOVLLM_COMPILED_GRAPH", "1").lower() not in ("0", "false", "no", "off")


class _DoneHandle:
    def __init__(self, error: Exception):
        self.error = error

    def result(self) -> ModelRunnerOutput:
        raise self.error


class _StepHandle:
    """One submitted step. Workers answer each call with the previous step's output, so this step's
    output is the reply to the next call: the next submit, or a collect-only call made here when
    the caller wants it before submitting again."""

    def __init__(self, executor: "RayExecutor"):
        self.executor = executor
        self.reply = None  # the call whose reply carries this step's output, once made
        self._output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:  # a compiled graph's reply can be read only once
            if self.reply is None:
                self.executor._collect_only()
            self._output = self.executor._get(self.reply)
        return self._output


class RayExecutor:
    """The Executor of engine_core for one replica. Not thread-safe: one step thread submits.

    Steps run on the workers in submission order (a compiled graph's executions, and an actor's
    calls from one caller, are ordered), so the engine keeps one step in flight while it handles
    the previous one: the worker feeds each sampled token into the next step itself. Workers reply
    to each call with the output of the step before (workers/worker_actor.py says why): the reply
    to step N + 1's call is step N's output.
    """

    overlaps_steps = True

    def __init__(self, workers: list, placement_group: PlacementGroup | None = None,
                 use_compiled_graph: bool | None = None, replica_id: int = 0):
        self.workers = workers  # ActorHandles, rank order
        self.placement_group = placement_group
        self.replica_id = replica_id
        self.broken = False  # a worker was lost: every later submit fails
        self._dag = self._compile() if compiled_graph_enabled(use_compiled_graph) else None
        self._last: _StepHandle | None = None  # the newest step, its output not yet asked for
        self._unread: list = []  # replies that carry no step's output, read in call order

    @property
    def uses_compiled_graph(self) -> bool:
        return self._dag is not None

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        try:
            with InputNode() as step:
                dag = MultiOutputNode([w.execute_model.bind(step) for w in self.workers])
            return dag.experimental_compile()
        except Exception:  # noqa: BLE001 - any failure to compile leaves the plain path, which always works
            logger.warning("replica %d: Ray compiled graph unavailable; using plain actor calls",
                           self.replica_id, exc_info=True)
            return None

    def submit(self, step: SchedulerOutput):
        if self.broken:
            return _DoneHandle(ReplicaDiedError(f"replica {self.replica_id} lost a worker"))
        try:
            reply = self._call(step)
        except WORKER_LOST_ERRORS as e:
            self.broken = True
            return _DoneHandle(ReplicaDiedError(str(e)))
        self._hand_reply(reply)
        self._last = _StepHandle(self)
        return self._last

    def _call(self, step: SchedulerOutput | None):
        if self._dag is not None:
            return self._dag.execute(step)
        return [w.execute_model.remote(step) for w in self.workers]

    def _hand_reply(self, reply) -> None:
        """A call's reply is the output of the newest step before it, if that one is still waiting."""
        if self._last is not None:
            self._last.reply, self._last = reply, None
        else:
            self._unread.append(reply)

    def _collect_only(self) -> None:
        try:
            self._hand_reply(self._call(None))
        except WORKER_LOST_ERRORS as e:
            self.broken = True
            raise ReplicaDiedError(str(e)) from e

    def _get(self, reply) -> ModelRunnerOutput:
        try:
            while self._unread:  # compiled graph replies are read in order; these hold no output
                self._get_one(self._unread.pop(0))
            return self._get_one(reply)
        except WORKER_LOST_ERRORS as e:
            self.broken = True
            raise ReplicaDiedError(str(e)) from e

    def _get_one(self, reply):
        # no timeout: a step may take long; a hung worker is killed by the liveness check, which
        # fails this get
        if self._dag is not None:
            return ray.get(reply, timeout=-1)[0]
        return ray.get(reply)[0]

    def ping_refs(self) -> list:
        """One liveness ping per rank, answered even while a step runs."""
        return [w.ping.options(concurrency_group=CTRL_GROUP).remote() for w in self.workers]

    def kill_workers(self) -> None:
        """Declare the replica lost: killing its workers fails any step waiting on them."""
        self.broken = True
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def shutdown(self, wait: bool = False) -> None:
        """Release actors, graph and placement group; by default without blocking the step loop.

        Tearing down a compiled graph whose peer died waits on Ray's timeouts (seconds), so it
        runs on a daemon thread, after the workers are killed so that nothing waits on them long.
        wait=True (engine shutdown) releases everything before returning, so that the placement
        group's GPUs are free when the caller goes on (a Serve replica replacing this engine).
        """
        dag, self._dag = self._dag, None
        workers, pg = self.workers, self.placement_group
        healthy, self.broken = not self.broken, True

        def teardown():
            try:
                dag.teardown()
            except Exception:  # noqa: BLE001 - a broken graph may fail its own teardown
                logger.debug("compiled graph teardown failed", exc_info=True)

        def release():
            # a graph over live workers tears down at once; over a dead one it waits on Ray's
            # timeouts (30 s) unless the workers are killed first
            if dag is not None and healthy:
                teardown()
            for w in workers:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            if dag is not None and not healthy:
                teardown()
            if pg is not None:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001
                    pass

        if dag is None or wait:
            release()
        else:
            threading.Thread(target=release, name=f"folovllm-teardown-r{self.replica_id}", daemon=True).start()
