"""SchedulerActor: the Ray actor that owns every request and steps every replica.

Two threads share it:
- the step thread owns the EngineCore. It applies queued frontend operations (add, abort, finish)
  at step boundaries, runs one step on every live replica at once, and hands each step's outputs
  to the event loop. Ray calls block only this thread.
- the actor's asyncio loop serves frontends (submit, get_outputs, status) and pings workers, so
  it never waits on a step. Lost replicas' actors are started again on a thread pool
  (cluster/replica_restarter.py).

Outputs are pulled: each frontend keeps one long-poll get_outputs(frontend_id) in flight and gets
every step's outputs since its last call in one reply. Pushing would need every frontend to be a
Ray actor and one call per step per frontend anyway; a pull batches by itself when the frontend
lags (several steps in one reply) and stops costing anything when the frontend goes away.

Frontends make both calls (submit and get_outputs) over a direct TCP link into the event loop
where they can (link_address(), cluster/engine_link.py): a Ray hop cost 1.1-1.5 ms each way.
"""
import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray

from cluster.config import EngineConfig
from cluster.engine_core import EngineCore, Replica
from cluster.engine_link import LinkServer, link_enabled
from cluster.engine_types import EngineStatus, ModelInfo, ReplicaStatus
from cluster.launcher import (EnginePlan, StartedReplica, plan_engine, remove_stale_placement_groups,
                              start_replica, start_replicas)
from cluster.llm_engine import build_scheduler
from cluster.ray_executor import WORKER_LOST_ERRORS, RayExecutor
from cluster.replica_restarter import ReplicaRestarter
from scheduler.errors import InvalidRequestError, QueueFullError
from scheduler.output import EngineCoreOutput, pack_outputs
from scheduler.token_ids import check_and_pack_token_ids
from workers.gc_freeze import freeze_startup_objects
from workers.worker_actor import WorkerActor

logger = logging.getLogger(__name__)

LIVENESS_PERIOD_S = 1.0  # how often idle and busy replicas are pinged
PING_TIMEOUT_S = 2.0  # a worker this slow to answer a ping (served beside any step) is declared lost
STALL_AFTER_S = 10.0  # making_progress turns false after this long with work pending and no step
FRONTEND_TIMEOUT_S = 60.0  # a frontend that stops polling this long has its requests aborted


def error_reply(e: Exception):
    """Exceptions cross Ray as plain tuples: InvalidRequestError's (field, message) would not unpickle."""
    if isinstance(e, InvalidRequestError):
        return ("invalid", e.field, str(e).removeprefix(f"{e.field}: "))
    if isinstance(e, QueueFullError):
        return ("queue_full", str(e))
    return ("error", f"{type(e).__name__}: {e}")


@dataclass
class _Frontend:
    steps: deque = field(default_factory=deque)  # (step_no, list[EngineCoreOutput]) not yet acknowledged
    next_step_no: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: float = field(default_factory=time.monotonic)
    polling: int = 0


class SchedulerActor:
    def __init__(self, config: EngineConfig, engine_id: str, use_compiled_graph: bool | None = None,
                 worker_cls: type = WorkerActor):
        logging.basicConfig(level=logging.INFO)
        # Blocking ray.get runs on the step, start and restart threads by design, never on the loop.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor: frontends notice
        self.engine_id = engine_id
        self.plan: EnginePlan = plan_engine(config, engine_id, use_compiled_graph, worker_cls)
        dp = config.parallel.data_parallel_size
        remove_stale_placement_groups(engine_id)  # left by a previous incarnation, if Ray restarted us
        started = start_replicas(self.plan, list(range(dp)))
        self.core = EngineCore([Replica(i, self._new_scheduler(s), s.executor) for i, s in enumerate(started)],
                               async_scheduling=config.runtime.async_scheduling)
        m = self.plan.model
        self.model_info = ModelInfo(config.model.model, m.max_model_len, m.hf_config.vocab_size,
                                    list(m.eos_token_ids))
        self._ops: queue.SimpleQueue = queue.SimpleQueue()  # callables run by the step thread
        self._wake = threading.Event()
        self._stopping = False
        self._routes: dict[str, str] = {}  # request id -> frontend id (step thread)
        self._restarter = ReplicaRestarter(lambda replica_id: start_replica(self.plan, replica_id),
                                           self._queue_revive, dp)
        self._preemptions_before_restarts = 0
        self._last_progress = time.monotonic()
        self._status = self._snapshot()  # replaced whole by the step thread: status() reads it lock-free
        self._frontends: dict[str, _Frontend] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._liveness_task: asyncio.Task | None = None
        self._link: asyncio.Future | None = None  # the LinkServer's start, once asked for (event loop)
        self._link_server: LinkServer | None = None  # once listening
        self._thread = threading.Thread(target=self._run, name="folovllm-step", daemon=True)
        freeze_startup_objects()  # Ray's and the replicas' start-up state: see workers/gc_freeze.py
        self._thread.start()

    # ---- frontend API (event loop) -----------------------------------------------------------------

    async def ready(self) -> tuple[ModelInfo, str]:
        self._attach_loop()
        return self.model_info, self.incarnation

    async def submit(self, frontend_id: str, ops: list[tuple]) -> tuple[str, list]:
        """Apply a batch of ("add", id, prompt, params, priority) / ("abort", id) /
        ("finish", id, index, stop_reason), in order, at the next step boundary.

        Returns (incarnation, one reply per op): None, or an error_reply tuple.
        """
        self._attach_loop()
        self._frontend(frontend_id).last_seen = time.monotonic()
        futures = []
        for op in ops:
            future = Future()
            early, packed = self._check_add(op) if op[0] == "add" else (None, None)
            if early is not None:
                future.set_result(early)
            else:
                self._ops.put((self._apply_op, frontend_id, op, future, packed))
            futures.append(future)
        self._wake.set()
        return self.incarnation, list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    async def get_outputs(self, frontend_id: str, incarnation: str | None = None, after: int = 0,
                          timeout_s: float = 5.0) -> tuple[str, list]:
        """Long poll: this frontend's steps numbered above `after`, as soon as there are any.

        Returns (incarnation, [(step_no, pack_outputs(outputs)), ...]). Steps stay until a later
        call acknowledges them with `after`, so a reply lost with its caller (a cancelled task, a
        closed event loop) is sent again. `after` counts in the caller's incarnation: from another
        one it means 0.
        """
        self._attach_loop()
        fe = self._frontend(frontend_id)
        if incarnation == self.incarnation:
            while fe.steps and fe.steps[0][0] <= after:
                fe.steps.popleft()
        fe.polling += 1
        try:
            if not fe.steps:
                fe.event.clear()
                try:
                    await asyncio.wait_for(fe.event.wait(), timeout_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            fe.polling -= 1
            fe.last_seen = time.monotonic()
        return self.incarnation, list(fe.steps)

    async def link_address(self) -> tuple[str, int, bytes] | None:
        """(host, port, token) of this incarnation's direct link for submit and get_outputs
        (cluster/engine_link.py), started on first use; None with FOLOVLLM_ENGINE_LINK=0 or where
        it cannot listen (frontends then call through Ray)."""
        self._attach_loop()
        if not link_enabled():
            return None
        if self._link is None:
            self._link = asyncio.ensure_future(self._start_link())
        server = await asyncio.shield(self._link)
        return None if server is None else (server.host, server.port, server.token)

    async def _start_link(self) -> LinkServer | None:
        server = LinkServer(self, ray.util.get_node_ip_address())
        try:
            await server.start()
        except OSError:
            logger.warning("cannot listen for the engine link on %s; frontends call through Ray", server.host,
                           exc_info=True)
            return None
        self._link_server = server
        return server

    async def status(self) -> EngineStatus:
        self._attach_loop()
        s = self._status
        pending = s.num_waiting > 0 or any(r.num_running for r in s.replicas)
        stalled = pending and time.monotonic() - self._last_progress > STALL_AFTER_S
        return EngineStatus(s.replicas, s.num_waiting, s.any_live, not stalled, s.num_preemptions)

    async def shutdown(self) -> None:
        self._stopping = True
        self._restarter.stop()
        if self._link_server is not None:
            self._link_server.close()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        for replica in self.core.replicas:
            if replica.executor is not None:
                await asyncio.get_running_loop().run_in_executor(None, replica.executor.shutdown, True)
                replica.executor = None

    # ---- test and operator helpers ----------------------------------------------------------------

    async def call_on_step_thread(self, fn, *args):
        """Run fn(core, *args) between steps and return its result (tests: check_no_leaks and such)."""
        future = Future()

        def call():
            try:
                future.set_result(fn(self.core, *args))
            except Exception as e:  # noqa: BLE001 - the caller's problem, not the step loop's
                future.set_exception(e)

        self._ops.put((call,))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def set_auto_restart(self, enabled: bool) -> None:
        """Operators (and tests): hold lost replicas down, e.g. while a node is being replaced."""
        self._restarter.enabled = enabled
        self._wake.set()

    async def check_no_leaks(self) -> None:
        """Between steps: every live replica's block manager holds no block (raises AssertionError)."""
        def check(core):
            for r in core.replicas:
                r.scheduler.block_manager.check_no_leaks()
        await self.call_on_step_thread(check)

    async def placements(self) -> dict[str, int]:
        return await self.call_on_step_thread(lambda core: dict(core.placements))

    async def worker_names(self) -> list[list[str]]:
        from cluster.launcher import worker_actor_name

        return [[worker_actor_name(self.engine_id, r.replica_id, t) for t in range(self.plan.tp_size)]
                for r in self.core.replicas]

    async def pid(self) -> int:
        return os.getpid()

    # ---- event loop internals ------------------------------------------------------------------------

    def _attach_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._liveness_task = self._loop.create_task(self._liveness())

    def _frontend(self, frontend_id: str) -> _Frontend:
        fe = self._frontends.get(frontend_id)
        if fe is None:
            fe = self._frontends[frontend_id] = _Frontend()
        return fe

    def _check_add(self, op: tuple) -> tuple:
        """Checks the scheduler does not make: token ids inside the vocabulary (a bad id would kill
        the step). (error_reply, None), or (None, the prompt packed as the scheduler keeps it), which
        the step thread hands on rather than packing the prompt a second time."""
        _, _, prompt, params, _ = op
        vocab = self.model_info.vocab_size
        try:
            _, packed = check_and_pack_token_ids(prompt, vocab)
            params.check_vocab(vocab)
        except InvalidRequestError as e:
            return error_reply(e), None
        return None, packed

    def _deliver(self, by_frontend: dict[str, tuple]) -> None:
        """Event loop: queue each frontend's step outputs (packed columns) for its next poll."""
        for frontend_id, outputs in by_frontend.items():
            fe = self._frontend(frontend_id)
            fe.next_step_no += 1
            fe.steps.append((fe.next_step_no, outputs))
            fe.event.set()

    async def _liveness(self) -> None:
        """Ping every live replica's workers: a dead one is noticed even while its replica is idle."""
        while not self._stopping:
            await asyncio.sleep(LIVENESS_PERIOD_S)
            checks = [(r.replica_id, r.executor) for r in self.core.replicas if r.executor is not None]
            results = await asyncio.gather(*(self._ping(ex) for _, ex in checks))
            for (replica_id, executor), alive in zip(checks, results):
                if not alive:
                    logger.warning("replica %d: a worker is lost; requeueing its sequences", replica_id)
                    executor.kill_workers()  # a hung worker is dead to us; this also fails its step
                    self._ops.put((self._lose_replica, replica_id, executor))
                    self._wake.set()
            self._expire_frontends()

    async def _ping(self, executor: RayExecutor) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*executor.ping_refs()), PING_TIMEOUT_S)
            return True
        except (asyncio.TimeoutError, *WORKER_LOST_ERRORS):
            return False

    def _expire_frontends(self) -> None:
        now = time.monotonic()
        for frontend_id, fe in list(self._frontends.items()):
            if not fe.polling and now - fe.last_seen > FRONTEND_TIMEOUT_S:
                del self._frontends[frontend_id]
                self._ops.put((self._drop_frontend, frontend_id))
                self._wake.set()

    # ---- step thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self._apply_ops():
                    self._status = self._snapshot()
                if any(r.live and (r.scheduler.has_unfinished_requests() or r.inflight) for r in self.core.replicas):
                    # ops queued while the step thread waits on the device join the step it
                    # submits next, not the one after: with two steps in flight, a decode step
                    # less before a new request's prefill
                    outputs = self.core.step(before_submit=self._apply_ops)
                    self._last_progress = time.monotonic()
                    self._status = self._snapshot()  # before the outputs: a finished client sees it
                    self._publish(outputs)
                else:
                    if self._ops.empty():
                        self._wake.wait(0.1)
                    self._wake.clear()
                    if not self.core.has_unfinished():
                        self._last_progress = time.monotonic()
                    self._status = self._snapshot()
                self._restarter.restart_lost(self.core.replicas)
        except BaseException:  # noqa: BLE001 - the engine cannot go on; let Ray restart the actor
            logger.exception("the step loop failed; exiting so that Ray restarts the scheduler actor")
            os._exit(1)

    def _apply_ops(self) -> bool:
        applied = False
        while True:
            try:
                fn, *args = self._ops.get_nowait()
            except queue.Empty:
                return applied
            fn(*args)
            applied = True

    def _apply_op(self, frontend_id: str, op: tuple, future: Future, packed_prompt: bytes | None = None) -> None:
        kind, req_id = op[0], op[1]
        reply = None
        try:
            if kind == "add":
                if not self.core.has_unfinished():
                    self._last_progress = time.monotonic()  # idle until now: the stall clock starts here
                self.core.add_request(req_id, op[2], op[3], op[4], packed_prompt=packed_prompt)
                self._routes[req_id] = frontend_id
            elif kind not in ("abort", "finish"):
                raise InvalidRequestError("op", f"unknown operation {kind!r}")
            elif self._routes.get(req_id) != frontend_id:
                pass  # finished already, or another frontend's request: not this caller's to touch
            elif kind == "abort":
                self._publish(self.core.abort(req_id))
                self._routes.pop(req_id, None)
            else:
                self.core.finish(req_id, op[2], op[3])
                self._drop_route_if_done(req_id)
        except Exception as e:  # noqa: BLE001 - the caller's error, sent back to it
            reply = error_reply(e)
        future.set_result(reply)

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        by_frontend: dict[str, list[EngineCoreOutput]] = {}
        for out in outputs:
            frontend_id = self._routes.get(out.req_id)
            if frontend_id is not None:
                by_frontend.setdefault(frontend_id, []).append(out)
        for out in outputs:
            if out.finished:
                self._drop_route_if_done(out.req_id)
        if by_frontend and self._loop is not None:
            packed = {frontend_id: pack_outputs(outs) for frontend_id, outs in by_frontend.items()}
            self._loop.call_soon_threadsafe(self._deliver, packed)

    def _drop_route_if_done(self, req_id: str) -> None:
        if req_id not in self.core.placements:
            self._routes.pop(req_id, None)

    def _drop_frontend(self, frontend_id: str) -> None:
        for req_id in [r for r, f in self._routes.items() if f == frontend_id]:
            self.core.abort(req_id)
            self._routes.pop(req_id, None)

    def _lose_replica(self, replica_id: int, executor: RayExecutor) -> None:
        replica = self.core.replicas[replica_id]
        if replica.executor is executor:  # else the step path noticed first
            self.core.mark_dead(replica)

    def _queue_revive(self, replica_id: int, started: StartedReplica) -> None:
        """Restart pool: the replica's new actors are up; the step thread takes them in."""
        self._ops.put((self._revive, replica_id, started))
        self._wake.set()

    def _revive(self, replica_id: int, started: StartedReplica) -> None:
        replica = self.core.replicas[replica_id]
        self._preemptions_before_restarts += replica.scheduler.num_preemptions
        self.core.revive(replica, started.executor, self._new_scheduler(started))
        self._restarter.revived(replica_id)
        logger.info("replica %d restarted (%d restarts)", replica_id, replica.restarts)

    def _new_scheduler(self, started: StartedReplica):
        return build_scheduler(self.plan.config, self.plan.model, started.num_blocks)

    def _snapshot(self) -> EngineStatus:
        replicas = []
        for r in self.core.replicas:
            stats = r.scheduler.get_stats()
            replicas.append(ReplicaStatus(r.replica_id, r.live, stats.num_running, stats.num_waiting,
                                          stats.kv_cache_usage, stats.prefix_cache_hit_rate, r.restarts))
        preemptions = self._preemptions_before_restarts + sum(r.scheduler.num_preemptions for r in self.core.replicas)
        return EngineStatus(replicas, sum(r.num_waiting for r in replicas), any(r.live for r in replicas),
                            True, preemptions)
