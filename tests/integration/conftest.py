"""Fixtures for the gRPC front-door tests (test_grpc_*.py); the harness they build is in grpc_fixtures.py.

The tokenizer (seconds to load) and the background event loop are session-scoped: one of each for all
the test_grpc_* modules, as when they were one module (and grpc.aio wants a single event loop per
process). Each test still gets its own servers, on ephemeral ports, closed when it ends.
"""
from __future__ import annotations

import pytest

from cluster.grpc_config import GrpcServerOptions
from cluster.grpc_server import build_server

try:
    from tests.integration.grpc_fixtures import MODEL_INFO, SCRIPT_TEXT, FakeEngine, Harness, LoopThread
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from grpc_fixtures import MODEL_INFO, SCRIPT_TEXT, FakeEngine, Harness, LoopThread


@pytest.fixture(scope="session")
def tokenizer():
    from workers.tokenizer import load_tokenizer

    return load_tokenizer("Qwen/Qwen3-0.6B")


@pytest.fixture(scope="session")
def script(tokenizer) -> list[int]:
    return tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def make_server(loop_thread, tokenizer, script):
    made: list[Harness] = []

    def make(engine_kwargs: dict | None = None, engine_script: list[int] | None = None, **options) -> Harness:
        engine = FakeEngine(MODEL_INFO, engine_script or script, **(engine_kwargs or {}))
        opts = GrpcServerOptions(port=0, health_poll_interval_s=0.05, **options)

        async def start():
            server = build_server(engine, tokenizer, opts)
            await server.start()
            return server

        harness = Harness(loop_thread.run(start()), engine, loop_thread)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def h(make_server) -> Harness:
    return make_server()
