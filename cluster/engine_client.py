"""EngineClient: how a frontend (gRPC server, Serve app, offline LLM) talks to the SchedulerActor.

Calls are batched: add_request / abort / finish calls made while a submit is in flight (or in the
same event-loop turn) go to the actor together in one Ray call. Outputs arrive through one long
poll per client, each reply holding every step since the last; the client splits them per request.

If the actor dies, every stream in flight ends with EngineDeadError, and so do calls until Ray has
restarted it (a new incarnation); requests made after that work again.

A consumer of many requests at once (the offline LLM) can take them through one sink instead of
a stream each: add_request_to_sink, and every poll's outputs reach the sink in one call.

The two calls go over the actor's direct link (cluster/engine_link.py) where it can connect, a Ray
hop shorter each way; otherwise, and with FOLOVLLM_ENGINE_LINK=0, through Ray.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import ray
from ray.exceptions import RayActorError

from cluster.engine_link import EngineLink, EngineLinkError, link_enabled
from cluster.engine_types import EngineStatus, ModelInfo
from scheduler.errors import EngineDeadError, InvalidRequestError, QueueFullError
from scheduler.output import EngineCoreOutput, unpack_outputs
from scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

POLL_TIMEOUT_S = 5.0
POLL_GRACE_S = 10.0  # a long poll over the link unanswered this long past its timeout: the link is dead
_DONE = object()
# a call whose reply is lost: the scheduler actor died or restarts (Ray), or the link to it broke
ENGINE_LOST_ERRORS = (RayActorError, EngineLinkError)

# A sink gets [(request_id, item), ...] in order, item being a list of outputs, None when the
# request ended, or the EngineDeadError that ended it. It is called on the client's event loop.
Sink = Callable[[list[tuple[str, object]]], None]


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _raise_reply(reply) -> None:
    if reply is None:
        return
    if reply[0] == "invalid":
        raise InvalidRequestError(reply[1], reply[2])
    if reply[0] == "queue_full":
        raise QueueFullError(reply[1])
    raise EngineDeadError(reply[1])


@dataclass
class _Stream:
    n: int
    num_prompt_tokens: int
    incarnation: str | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[int] = field(default_factory=set)
    sink: Sink | None = None  # instead of the queue

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.n


class EngineClient:
    """The EngineClientProtocol of cluster/engine_types.py, on the SchedulerActor. One per event loop."""

    def __init__(self, actor, model_info: ModelInfo, *, poll_timeout_s: float = POLL_TIMEOUT_S):
        self.actor = actor
        self.model_info = model_info
        self.frontend_id = uuid.uuid4().hex
        self.poll_timeout_s = poll_timeout_s
        self._streams: dict[str, _Stream] = {}
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flush_task: asyncio.Task | None = None
        self._poll_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._incarnation: str | None = None
        self._last_step_no = 0  # the last step of outputs received (acknowledged by the next poll)
        self._closed = False
        self._use_link = link_enabled()  # until the link turns out unreachable
        self._link: EngineLink | None = None
        self._linking: asyncio.Future | None = None  # the connect in progress, shared by callers

    @classmethod
    async def connect(cls, engine_id: str | None = None, *, name: str | None = None,
                      namespace: str | None = None) -> "EngineClient":
        """Attach to a running engine by its engine id (or the scheduler actor's full name)."""
        from cluster.launcher import NAMESPACE, scheduler_actor_name

        name = name or scheduler_actor_name(engine_id)
        try:
            actor = ray.get_actor(name, namespace=namespace or NAMESPACE)
        except ValueError:
            raise EngineDeadError(f"no engine actor {name!r} in namespace {namespace or NAMESPACE!r}") from None
        model_info, incarnation = await actor.ready.remote()
        client = cls(actor, model_info)
        client._incarnation = incarnation
        return client

    # ---- the contract ----------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                          priority: int = 0) -> AsyncIterator[list[EngineCoreOutput]]:
        """Validate (raising InvalidRequestError / QueueFullError / EngineDeadError), then stream."""
        stream = await self._add(request_id, prompt_token_ids, sampling_params, priority, None)
        return self._iterate(request_id, stream)

    async def add_request_to_sink(self, request_id: str, prompt_token_ids: list[int],
                                  sampling_params: SamplingParams, priority: int, sink: Sink) -> None:
        """add_request, with the outputs going to sink (see Sink) rather than to a stream."""
        await self._add(request_id, prompt_token_ids, sampling_params, priority, sink)

    async def _add(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                   priority: int, sink: Sink | None) -> _Stream:
        self._ensure_started()
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError("sampling_params",
                                      f"must be a SamplingParams, got {type(sampling_params).__name__}")
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use by an unfinished request")
        stream = _Stream(sampling_params.n, len(prompt_token_ids), sink=sink)
        self._streams[request_id] = stream  # before sending: the first outputs may beat the reply
        try:
            op = ("add", request_id, list(prompt_token_ids), sampling_params, priority)
            incarnation, reply = await self._send(op)
            _raise_reply(reply)
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        stream.incarnation = incarnation
        return stream

    async def finish(self, request_id: str, index: int, stop_reason: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished.add(index)
            if stream.done:
                self._end(request_id, stream)
        await self._send_quietly(("finish", request_id, index, stop_reason))

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:  # end the stream now, as the engine will: one "abort" output per sibling left
            outs = [EngineCoreOutput(request_id, i, [], finish_reason="abort",
                                     num_prompt_tokens=stream.num_prompt_tokens)
                    for i in range(stream.n) if i not in stream.finished]
            stream.finished.update(range(stream.n))
            if outs:
                self._put(stream, request_id, outs)
            self._end(request_id, stream)
        await self._send_quietly(("abort", request_id))

    async def status(self) -> EngineStatus:
        try:
            return await self.actor.status.remote()
        except RayActorError as e:
            raise EngineDeadError(f"the engine's scheduler actor is unavailable: {e}") from None

    def close(self) -> None:
        """Stop polling; streams still open end with EngineDeadError."""
        self._closed = True
        self._fail_streams(EngineDeadError("the engine client was closed"))
        if self._link is not None:  # on its own loop: close() may come from another thread
            if self._loop is not None and self._loop.is_running() and not _running_on(self._loop):
                self._loop.call_soon_threadsafe(self._link.close)
            else:
                self._link.close()
        for task in (self._poll_task, self._flush_task):
            if task is not None and not task.done() and task.get_loop().is_running():
                task.get_loop().call_soon_threadsafe(task.cancel)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def uses_link(self) -> bool:
        """Whether calls go over the direct link (connected, not broken) rather than through Ray."""
        return self._use_link and self._link is not None and not self._link.broken

    # ---- sending, batched ------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine client was closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new loop (asyncio.run per call): start over there
            orphans = list(self._streams)
            self._fail_streams(EngineDeadError("the engine client moved to another event loop"))
            self._loop, self._pending = loop, []
            self._flush_task = None
            self._link = self._linking = None  # the old loop's connection goes with it
            self._poll_task = loop.create_task(self._poll())
            for request_id in orphans:  # nobody can read them any more: free their blocks
                loop.create_task(self._send_quietly(("abort", request_id)))

    def _send(self, op: tuple) -> asyncio.Future:
        future = self._loop.create_future()
        self._pending.append((op, future))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._loop.create_task(self._flush())
        return future

    async def _send_quietly(self, op: tuple) -> None:
        """abort and finish never fail the caller: a dead engine has dropped the request anyway."""
        try:
            self._ensure_started()
            _, reply = await self._send(op)
        except EngineDeadError:
            return
        if reply is not None:
            logger.debug("%s %s: %s", op[0], op[1], reply)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                incarnation, replies = await self._call("submit", self.frontend_id, [op for op, _ in batch])
            except ENGINE_LOST_ERRORS as e:
                lost = "is unreachable" if isinstance(e, EngineLinkError) else "died"
                for _, future in batch:
                    if not future.done():
                        future.set_exception(EngineDeadError(f"the engine's scheduler actor {lost}: {e}"))
                if isinstance(e, EngineLinkError):  # the actor may live and have added them: free them
                    for op, _ in batch:
                        if op[0] == "add":
                            self._loop.create_task(self._send_quietly(("abort", op[1])))
                continue
            except GeneratorExit:  # destroyed pending with its closed loop: nobody is left to tell
                raise
            except BaseException as e:  # noqa: BLE001 - e.g. cancelled: fail the callers, never hang them
                for _, future in batch:
                    if not future.done():
                        future.set_exception(EngineDeadError(f"sending to the engine failed: {e!r}"))
                raise
            for (_, future), reply in zip(batch, replies):
                if not future.done():
                    future.set_result((incarnation, reply))

    async def _call(self, method: str, *args):
        """The actor's method (submit or get_outputs) over the link, or through Ray without one."""
        link = await self._connected_link() if self._use_link else None
        if link is not None:
            timeout = self.poll_timeout_s + POLL_GRACE_S if method == "get_outputs" else None
            return await link.call(method, *args, timeout=timeout)
        return await getattr(self.actor, method).remote(*args)

    async def _connected_link(self) -> EngineLink | None:
        if self._link is not None and not self._link.broken:
            return self._link
        if self._linking is None or self._linking.done():
            self._linking = asyncio.ensure_future(self._connect_link())
        return await asyncio.shield(self._linking)

    async def _connect_link(self) -> EngineLink | None:
        """A new link to this incarnation (its address comes through Ray, so an actor that is down
        raises RayActorError here); None, from now on, where the actor offers none or it cannot be
        reached."""
        try:
            address = await self.actor.link_address.remote()
            if address is None:
                self._use_link = False
                return None
            self._link = await EngineLink.connect(*address)
        except RayActorError:
            raise
        except Exception as e:  # noqa: BLE001 - no link (an older actor, a port out of reach): Ray still works
            logger.warning("no link to the engine (%s); calling it through Ray instead", e)
            self._use_link = False
            return None
        return self._link

    # ---- receiving ---------------------------------------------------------------------------------

    async def _poll(self) -> None:
        while not self._closed:
            try:
                incarnation, steps = await self._call(
                    "get_outputs", self.frontend_id, self._incarnation, self._last_step_no, self.poll_timeout_s)
            except EngineLinkError:
                # the next poll connects again and gets every step not yet acknowledged; if the
                # actor died, asking it for the new link's address raises RayActorError
                await asyncio.sleep(0.01)
                continue
            except RayActorError as e:
                self._fail_streams(EngineDeadError(f"the engine's scheduler actor died: {e}"))
                await asyncio.sleep(0.5)  # it may be restarting
                continue
            except Exception as e:  # noqa: BLE001 - never leave a stream hanging on a poller that died
                logger.exception("polling the engine failed")
                self._fail_streams(EngineDeadError(f"receiving from the engine failed: {e!r}"))
                await asyncio.sleep(0.5)
                continue
            if incarnation != self._incarnation:
                if self._incarnation is not None:  # Ray restarted the actor: the old requests are gone
                    self._fail_streams(EngineDeadError("the engine restarted"), keep=incarnation)
                self._incarnation, self._last_step_no = incarnation, 0
            for step_no, packed in steps:
                if step_no > self._last_step_no:  # a step resent after a lost reply is skipped
                    self._last_step_no = step_no
                    self._dispatch(unpack_outputs(packed))

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        by_request: dict[str, list[EngineCoreOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.req_id, []).append(out)
        to_sinks: dict[Sink, list] = {}  # one call per sink for the whole step
        for request_id, outs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted or finished here already
            outs = [o for o in outs if o.index not in stream.finished]
            if not outs:
                continue
            stream.finished.update(o.index for o in outs if o.finished)
            if stream.sink is None:
                stream.queue.put_nowait(outs)
                if stream.done:
                    self._end(request_id, stream)
                continue
            items = to_sinks.setdefault(stream.sink, [])
            items.append((request_id, outs))
            if stream.done:
                del self._streams[request_id]
                items.append((request_id, None))
        for sink, items in to_sinks.items():
            sink(items)

    @staticmethod
    def _put(stream: _Stream, request_id: str, item) -> None:
        """One item to the stream's consumer: outputs, _DONE, or an exception."""
        if stream.sink is None:
            stream.queue.put_nowait(item)
        else:
            stream.sink([(request_id, None if item is _DONE else item)])

    def _end(self, request_id: str, stream: _Stream) -> None:
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]
        self._put(stream, request_id, _DONE)

    def _fail_streams(self, error: EngineDeadError, keep: str | None = None) -> None:
        for request_id, stream in list(self._streams.items()):
            if keep is not None and stream.incarnation in (keep, None):
                continue  # added to the new incarnation (or still being added)
            del self._streams[request_id]
            self._put(stream, request_id, error)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[list[EngineCoreOutput]]:
        try:
            while True:
                item = await stream.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._streams.get(request_id) is stream:  # the consumer left early: free the engine's blocks
                del self._streams[request_id]
                try:
                    asyncio.get_running_loop().create_task(self._send_quietly(("abort", request_id)))
                except RuntimeError:  # closed outside any loop (garbage collection): nothing to send on
                    pass
