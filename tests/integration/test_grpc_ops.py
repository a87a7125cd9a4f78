"""The gRPC front door, operations: model info, status, tokenize/detokenize, health transitions,
reflection, metrics, drain and SIGTERM. Against a fake engine and the real Qwen3 tokenizer, on loopback
only; the harness and fixtures are in grpc_fixtures.py and conftest.py.
"""
from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Client, InvalidArgument, Unavailable
from scheduler.sampling_params import SamplingParams

try:
    from tests.integration.grpc_fixtures import EOS, MODEL_INFO, SCRIPT_TEXT
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from grpc_fixtures import EOS, MODEL_INFO, SCRIPT_TEXT

pytestmark = pytest.mark.slow  # a real tokenizer, a server subprocess


# --- model info, status, tokenize -------------------------------------------------------------

def test_model_info_status_tokenize(h, tokenizer, script):
    client = h.client()
    info, defaults = client.model_info()
    assert info == MODEL_INFO
    assert defaults == SamplingParams()
    status = client.status()
    assert status.any_live and status.making_progress and len(status.replicas) == 2
    assert status.num_preemptions == 3 and status.replicas[1].worker_restarts == 1
    assert client.tokenize(SCRIPT_TEXT) == script
    assert client.detokenize(script) == SCRIPT_TEXT
    assert client.detokenize([EOS], skip_special_tokens=False) == "<|im_end|>"
    messages = [{"role": "user", "content": "hi"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert client.tokenize(messages, enable_thinking=False) == tokenizer.encode(expected, add_special_tokens=False)


# --- health, reflection, metrics, drain -------------------------------------------------------

def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=5).status


def _wait_health(target: str, want: int, service: str = "", timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(target, service) != want:
        assert time.monotonic() < deadline, f"health never became {want}"
        time.sleep(0.02)


def test_health_transitions_and_reflection(h):
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    _wait_health(h.target, serving)
    _wait_health(h.target, serving, service="folovllm.v1.LLMService")
    h.engine.live = False
    _wait_health(h.target, not_serving)
    assert _health(h.target, "folovllm.v1.LLMService") == not_serving
    h.engine.live = True
    _wait_health(h.target, serving)

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(h.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"folovllm.v1.LLMService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint(make_server):
    h = make_server(metrics_port=0)
    client = h.client()
    client.generate("x", SamplingParams(max_tokens=3))
    client.generate("x", SamplingParams(max_tokens=3, n=2))
    client.generate("x", SamplingParams(max_tokens=30, stop=["answer"]))
    with pytest.raises(InvalidArgument):
        client.generate("x", request_id="r" * 300)
    time.sleep(0.2)  # one status poll for the gauges
    body = urllib.request.urlopen(f"http://127.0.0.1:{h.server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'folovllm_requests_total{finish_reason="length"} 3.0' in body
    assert 'folovllm_requests_total{finish_reason="stop"} 1.0' in body
    assert 'folovllm_request_errors_total{code="INVALID_ARGUMENT"} 1.0' in body
    assert "folovllm_time_to_first_token_seconds_count 3.0" in body
    assert "folovllm_e2e_request_latency_seconds_count 3.0" in body
    assert "folovllm_inter_token_latency_seconds_count" in body
    assert 'folovllm_prefix_cache_hit_rate{replica="0"} 0.25' in body
    assert 'folovllm_worker_restarts{replica="1"} 1.0' in body
    assert "folovllm_num_preemptions 3.0" in body and "folovllm_num_requests_waiting 0.0" in body
    assert 'folovllm_kv_cache_usage_ratio{replica="0"}' in body


def test_drain_finishes_in_flight_and_refuses_new(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.01})
    client = h.client()
    stream = client.generate_stream("x", SamplingParams(max_tokens=30, ignore_eos=True))
    first = next(stream)
    drain_future = asyncio.run_coroutine_threadsafe(h.server.drain(timeout_s=5), h.loop.loop)
    h.wait_for(lambda e: h.server.servicer.draining)
    with pytest.raises(Unavailable, match="draining"):
        client.generate("y")
    rest = list(stream)
    assert first.finish_reason is None and rest[-1].finish_reason == "length"
    drain_future.result(5)
    h.assert_clean()


def test_drain_timeout_aborts_stragglers(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.01})
    client = h.client()
    stream = client.generate_stream("x", SamplingParams(max_tokens=250, ignore_eos=True), request_id="straggler")
    next(stream)
    h.loop.run(h.server.drain(timeout_s=0.2))
    assert "straggler" in h.engine.aborted
    assert list(stream)[-1].finish_reason == "abort"  # ended by the abort, before the server stopped
    h.assert_clean()


SERVE_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests/integration"]
    from fake_engine import FakeEngine
    from cluster.engine_types import ModelInfo
    from cluster.grpc_config import GrpcServerOptions
    from cluster.grpc_server import serve

    class ByteTokenizer:  # a stand-in: the real tokenizer costs seconds to load in a fresh process
        def encode(self, text, add_special_tokens=False): return list(text.encode())
        def decode(self, ids, skip_special_tokens=True): return bytes(ids).decode(errors="replace")
        def apply_chat_template(self, messages, **kw): return "".join(m["content"] for m in messages)

    engine = FakeEngine(ModelInfo("fake", 512, 256, [0]), list(b"abcdefgh"), step_interval_s=0.01)
    def started(server): print(server.port, flush=True)
    asyncio.run(serve(engine, ByteTokenizer(), GrpcServerOptions(port=0, drain_timeout_s=5), on_started=started))
    print("drained", flush=True)
""")


def test_sigterm_drains(tmp_path):
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, repo], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": repo})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the server did not start"
        port = int(proc.stdout.readline())
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            stream = client.generate_stream("x", SamplingParams(max_tokens=40, ignore_eos=True))
            next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)  # the in-flight stream still finishes
            assert rest[-1].finish_reason == "length"
        assert proc.wait(10) == 0 and proc.stdout.read().strip() == "drained"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
