"""A fake EngineClient for frontend tests: same contract as cluster/engine_client.py, no Ray, no model.

Each sibling's k-th output token is script[(k + 3 * index) % len(script)]. One background step
loop (an asyncio task) admits waiting requests while blocks and running slots allow, gives every
running sibling one token per step and publishes each request's outputs once per step. Blocks are
allocated on admission (prompt + max_tokens, whole blocks per sibling) and freed on finish, abort
and stop-string finish; tests assert num_used_blocks == 0 afterwards.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cluster.engine_types import EngineStatus, ModelInfo, ReplicaStatus
from scheduler.errors import EngineDeadError, InvalidRequestError, QueueFullError
from scheduler.output import EngineCoreOutput, TokenLogprobs
from scheduler.sampling_params import SamplingParams

_DONE = object()  # end of a request's output queue


@dataclass
class _Seq:
    index: int
    output: list[int] = field(default_factory=list)
    finished: bool = False
    num_blocks: int = 0


@dataclass
class _Req:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    seqs: list[_Seq]
    queue: asyncio.Queue
    first_step: bool = True

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class FakeEngine:
    def __init__(self, model_info: ModelInfo, script: list[int], *, step_interval_s: float = 0.002,
                 block_size: int = 16, num_blocks: int = 4096, max_running: int = 64, max_waiting: int = 64,
                 num_replicas: int = 2):
        self.model_info = model_info
        self.script = list(script)
        self.step_interval_s = step_interval_s
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.num_replicas = num_replicas
        self.paused = False  # while set, nothing is admitted (requests stay queued)
        self.live = True  # status().any_live
        self.dead = False  # add_request raises EngineDeadError
        self.num_used_blocks = 0
        self.aborted: list[str] = []
        self.finished_by_frontend: list[tuple[str, int, str]] = []
        self.num_steps = 0
        self._waiting: list[_Req] = []
        self._running: dict[str, _Req] = {}
        self._loop_task: asyncio.Task | None = None

    # --- the EngineClient contract ------------------------------------------------------------

    async def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                          priority: int = 0):
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        if len(prompt_token_ids) > self.model_info.max_model_len:
            raise InvalidRequestError("prompt_token_ids", f"prompt has {len(prompt_token_ids)} tokens, "
                                                          f"over max_model_len {self.model_info.max_model_len}")
        if request_id in self._running or any(r.request_id == request_id for r in self._waiting):
            raise InvalidRequestError("request_id", f"{request_id!r} is in use")
        if len(self._waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self._waiting)} requests waiting")
        req = _Req(request_id, list(prompt_token_ids), sampling_params, priority,
                   [_Seq(i) for i in range(sampling_params.n)], asyncio.Queue())
        self._waiting.append(req)
        self._waiting.sort(key=lambda r: r.priority)
        self._ensure_loop()
        return self._outputs(req)

    async def finish(self, request_id: str, index: int, stop_reason: str) -> None:
        req = self._running.get(request_id)
        if req is None or req.seqs[index].finished:
            return
        self.finished_by_frontend.append((request_id, index, stop_reason))
        self._finish_seq(req, req.seqs[index])
        self._retire_if_done(req)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        req = self._running.pop(request_id, None)
        if req is None:
            req = next((r for r in self._waiting if r.request_id == request_id), None)
            if req is None:
                return
            self._waiting.remove(req)
        outs = [self._out(req, s, [], "abort") for s in req.seqs if not s.finished]
        for seq in req.seqs:
            self._finish_seq(req, seq)
        req.queue.put_nowait(outs)
        req.queue.put_nowait(_DONE)

    async def status(self) -> EngineStatus:
        running = list(self._running.values())
        replicas = [ReplicaStatus(
            replica_id=i, live=self.live,
            num_running=sum(1 for r in running if hash(r.request_id) % self.num_replicas == i),
            num_waiting=0, kv_usage=self.num_used_blocks / self.num_blocks,
            prefix_cache_hit_rate=0.25, worker_restarts=i) for i in range(self.num_replicas)]
        return EngineStatus(replicas=replicas, num_waiting=len(self._waiting), any_live=self.live,
                            making_progress=self.live, num_preemptions=3)

    # --- test helpers -------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self._waiting) + len(self._running)

    async def kill(self) -> None:
        """The engine dies: streams in flight end with EngineDeadError, later calls raise it."""
        self.dead = True
        for req in [*self._waiting, *self._running.values()]:
            for seq in req.seqs:
                self._finish_seq(req, seq)
            req.queue.put_nowait(EngineDeadError("fake engine died"))
        self._waiting.clear()
        self._running.clear()

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass

    # --- the step loop ------------------------------------------------------------------------

    async def _outputs(self, req: _Req):
        while True:
            item = await req.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step_interval_s)
            self._admit()
            self._step()

    def _blocks_per_seq(self, req: _Req) -> int:
        max_tokens = req.params.max_tokens or self.model_info.max_model_len
        total = min(len(req.prompt) + max_tokens, self.model_info.max_model_len)
        return -(-total // self.block_size)

    def _admit(self) -> None:
        while self._waiting and not self.paused and len(self._running) < self.max_running:
            req = self._waiting[0]
            need = self._blocks_per_seq(req) * len(req.seqs)
            if self.num_used_blocks + need > self.num_blocks:
                return
            self._waiting.pop(0)
            for seq in req.seqs:
                seq.num_blocks = self._blocks_per_seq(req)
            self.num_used_blocks += need
            self._running[req.request_id] = req

    def _step(self) -> None:
        self.num_steps += 1
        for req in list(self._running.values()):
            outs = [self._step_seq(req, seq) for seq in req.seqs if not seq.finished]
            req.first_step = False
            if outs:
                req.queue.put_nowait(outs)
            self._retire_if_done(req)

    def _step_seq(self, req: _Req, seq: _Seq) -> EngineCoreOutput:
        token = self.script[(len(seq.output) + 3 * seq.index) % len(self.script)]
        seq.output.append(token)
        params, n_out = req.params, len(seq.output)
        finish, stop_reason = None, None
        if n_out >= params.min_tokens and token in params.stop_token_ids:
            finish, stop_reason = "stop", token
        elif n_out >= params.min_tokens and not params.ignore_eos and token in self.model_info.eos_token_ids:
            finish = "stop"
        elif (params.max_tokens is not None and n_out >= params.max_tokens) or \
                len(req.prompt) + n_out >= self.model_info.max_model_len:
            finish = "length"
        if finish is not None:
            self._finish_seq(req, seq)
        return self._out(req, seq, [token], finish, stop_reason)

    def _out(self, req: _Req, seq: _Seq, tokens: list[int], finish: str | None, stop_reason=None):
        logprobs = None
        if req.params.logprobs is not None and tokens:
            k = req.params.logprobs
            logprobs = [TokenLogprobs(-0.5, [t + j for j in range(k)], [-0.5 - j for j in range(k)])
                        for t in tokens]
        return EngineCoreOutput(req_id=req.request_id, index=seq.index, new_token_ids=tokens,
                                new_logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason,
                                num_prompt_tokens=len(req.prompt),
                                num_cached_tokens=(len(req.prompt) // 2) if req.first_step else 0)

    def _finish_seq(self, req: _Req, seq: _Seq) -> None:
        if not seq.finished:
            seq.finished = True
            self.num_used_blocks -= seq.num_blocks
            seq.num_blocks = 0

    def _retire_if_done(self, req: _Req) -> None:
        if req.finished and self._running.pop(req.request_id, None) is not None:
            req.queue.put_nowait(_DONE)
