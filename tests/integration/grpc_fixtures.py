"""Shared harness for the gRPC front-door tests (test_grpc_*.py): constants, the background event loop,
the per-test server harness and a stream helper. The pytest fixtures that build them live in
tests/integration/conftest.py.

Every server and the fake engine run in one event loop in a daemon thread, shared by the whole test
session (grpc.aio dislikes several event loops in one process); async clients run on that loop too,
through LoopThread.run. Servers listen on ephemeral 127.0.0.1 ports; every loop is bounded by a deadline.
"""
from __future__ import annotations

import asyncio
import threading
import time

from cluster.client import Client
from cluster.engine_types import ModelInfo

try:
    from tests.integration.fake_engine import FakeEngine
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from fake_engine import FakeEngine

MODEL_INFO = ModelInfo("Qwen/Qwen3-0.6B", max_model_len=256, vocab_size=151936, eos_token_ids=[151645, 151643])
SCRIPT_TEXT = " The answer is forty-two. 你好世界! Done."
EOS = 151645


class LoopThread:
    """An event loop in a daemon thread: servers and the fake engine live there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Harness:
    def __init__(self, server, engine: FakeEngine, loop: LoopThread):
        self.server, self.engine, self.loop = server, engine, loop
        self.target = f"127.0.0.1:{server.port}"
        self._clients: list[Client] = []

    def client(self, **kwargs) -> Client:
        kwargs.setdefault("timeout", 10.0)
        client = Client(self.target, **kwargs)
        self._clients.append(client)
        return client

    def wait_for(self, predicate, timeout: float = 3.0) -> None:
        """Poll predicate(engine) in the engine's loop until true; fail after timeout seconds."""
        async def check():
            return predicate(self.engine)

        deadline = time.monotonic() + timeout
        while not self.loop.run(check()):
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.01)

    def assert_clean(self) -> None:
        self.wait_for(lambda e: e.num_used_blocks == 0 and e.num_requests == 0)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.loop.run(self.server.stop(0))
        self.loop.run(self.engine.close())


def drain(stream) -> tuple[dict[int, str], list]:
    texts, deltas = {}, []
    for d in stream:
        texts[d.index] = texts.get(d.index, "") + d.text
        deltas.append(d)
    return texts, deltas

