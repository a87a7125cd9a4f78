"""RayEngineCore: EngineCore's synchronous surface over the Ray engine, for the offline LLMEngine.

    core = RayEngineCore.launch(config)        # or RayEngineCore(EngineClient, shutdown)
    core.add_request(...); while core.has_unfinished(): core.step(); core.shutdown()

add_request(s) / abort / finish / step / has_unfinished behave as EngineCore's, so LLMEngine can hold
either. An EngineClient runs on a private event-loop thread; step() blocks until some request
made progress and returns at most one step's outputs per request (what the output processor expects).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from typing import Callable

from cluster.config import EngineConfig
from scheduler.output import EngineCoreOutput
from scheduler.sampling_params import SamplingParams


class RayEngineCore:
    def __init__(self, client, shutdown=None):
        self._shutdown = shutdown
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="folovllm-client", daemon=True)
        self._thread.start()
        self.client = client
        # the client's sink: one list of (req_id, outputs | None when ended | EngineDeadError) a poll
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = self._items.put  # one object for every request, so the client calls it once a poll
        self._held: deque = deque()  # (req_id, payload) taken from _items, not yet returned by step()
        self._open: set[str] = set()

    @classmethod
    def launch(cls, config: EngineConfig, **launch_args) -> "RayEngineCore":
        from cluster.launcher import launch_engine

        client, shutdown = launch_engine(config, **launch_args)
        return cls(client, shutdown)

    @classmethod
    def connect(cls, engine_id: str) -> "RayEngineCore":
        """Attach to a running engine (launched by another process) by its engine id."""
        from cluster.engine_client import EngineClient

        core = cls(None)
        core.client = core._call(EngineClient.connect(engine_id))
        return core

    @property
    def model_info(self):
        return self.client.model_info

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- EngineCore's surface -----------------------------------------------------------------------

    def add_request(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        self.add_requests([(req_id, prompt_token_ids, sampling_params, priority, arrival_time)])

    def add_requests(self, requests: list[tuple]) -> None:
        """(req_id, prompt_token_ids, sampling_params, priority, arrival_time[, packed_prompt]) each,
        all or none. The scheduler actor checks and packs the ids itself: a packing is not sent.

        Sent together they reach the scheduler in one batch at one step boundary; one by one,
        each add would wait for a step boundary of its own while the engine ran a part batch.
        """
        async def add_all():
            return await asyncio.gather(*(self.client.add_request_to_sink(r[0], r[1], r[2], r[3], self._sink)
                                          for r in requests), return_exceptions=True)

        self._open.update(r[0] for r in requests)  # before the first outputs can arrive
        results = self._call(add_all())
        errors = [r for r in results if isinstance(r, BaseException)]
        for (req_id, *_), result in zip(requests, results):
            if isinstance(result, BaseException):
                self._open.discard(req_id)
            elif errors:
                self._call(self.client.abort(req_id))  # its "abort" outputs are dropped by step()
                self._open.discard(req_id)
        if errors:
            raise errors[0]

    def abort(self, req_id: str) -> list[EngineCoreOutput]:
        """The "abort" outputs come through step(), like every other output of the request."""
        self._call(self.client.abort(req_id))
        return []

    def finish(self, req_id: str, index: int, stop_reason: str) -> None:
        self._call(self.client.finish(req_id, index, stop_reason))

    def has_unfinished(self) -> bool:
        return bool(self._open)

    def step(self, while_waiting: Callable[[], None] | None = None) -> list[EngineCoreOutput]:
        """The next outputs of each open request, at most one step's each; while_waiting() runs
        once before this blocks for them (EngineCore.step's)."""
        batch: dict[str, list[EngineCoreOutput]] = {}
        error = None
        while True:
            if not self._held:
                if not self._open:
                    break
                block = not batch and error is None
                if block and while_waiting is not None:
                    while_waiting()
                    while_waiting = None
                items = self._next(block=block)
                if items is None:
                    break
                self._held.extend(items)
                continue
            req_id, payload = self._held[0]
            if req_id not in self._open:  # aborted as part of a refused batch
                self._held.popleft()
            elif payload is None:
                self._open.discard(req_id)
                self._held.popleft()
            elif isinstance(payload, Exception):
                self._open.discard(req_id)
                error = error or payload
                self._held.popleft()
            elif req_id in batch:
                break  # at most one step's outputs per request and call
            else:
                batch[req_id] = payload
                self._held.popleft()
        if error is not None:
            raise error
        return [out for outputs in batch.values() for out in outputs]

    def _next(self, block: bool):
        try:
            return self._items.get(timeout=None) if block else self._items.get_nowait()
        except queue.Empty:
            return None

    def shutdown(self) -> None:
        """Close the client (and stop the engine when this object launched it)."""
        if self.client is not None:
            self._loop.call_soon_threadsafe(self.client.close)
        try:
            self._call(_cancel_tasks())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
            if self._shutdown is not None:
                self._shutdown()


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
