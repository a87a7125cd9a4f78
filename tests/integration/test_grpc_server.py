"""The gRPC front door against a fake engine and the real Qwen3 tokenizer, on loopback only.

Each test builds its own server on an ephemeral 127.0.0.1 port (in a background event loop) and
talks to it with cluster.client; every loop is bounded by a deadline.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import (AsyncClient, Client, DeadlineExceeded, InvalidArgument,
                            ResourceExhausted, Unauthenticated, Unavailable)
from cluster.engine_types import ModelInfo
from cluster.grpc_config import GrpcServerOptions
from cluster.grpc_server import build_server
from protos.folovllm.v1 import llm_pb2 as pb
from protos.folovllm.v1 import llm_pb2_grpc as pb_grpc
from scheduler.sampling_params import SamplingParams

try:
    from tests.integration.fake_engine import FakeEngine
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from fake_engine import FakeEngine

pytestmark = pytest.mark.slow  # ~30 s for the module: a real tokenizer, ~40 servers, a fuzz run

MODEL_INFO = ModelInfo("Qwen/Qwen3-0.6B", max_model_len=256, vocab_size=151936, eos_token_ids=[151645, 151643])
SCRIPT_TEXT = " The answer is forty-two. 你好世界! Done."
EOS = 151645


# --- harness ----------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def tokenizer():
    from workers.tokenizer import load_tokenizer

    return load_tokenizer("Qwen/Qwen3-0.6B")


@pytest.fixture(scope="module")
def script(tokenizer) -> list[int]:
    return tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)


@pytest.fixture(scope="module")
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


def drain(stream) -> tuple[dict[int, str], list]:
    texts, deltas = {}, []
    for d in stream:
        texts[d.index] = texts.get(d.index, "") + d.text
        deltas.append(d)
    return texts, deltas


# --- generation -------------------------------------------------------------------------------

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


def test_stream_equals_non_stream(h, tokenizer, script):
    client = h.client()
    params = SamplingParams(n=2, max_tokens=len(script), logprobs=2, seed=7)
    texts, deltas = drain(client.generate_stream("Tell me", params, request_id="r-stream"))
    full = client.generate("Tell me", params, request_id="r-full")
    assert [o.text for o in full.outputs] == [texts[0], texts[1]]
    assert full.text == SCRIPT_TEXT == tokenizer.decode(script)
    sib1 = [script[(k + 3) % len(script)] for k in range(len(script))]
    assert full.outputs[1].token_ids == sib1 and full.outputs[1].text == tokenizer.decode(sib1)
    assert all(o.finish_reason == "length" and o.num_completion_tokens == len(script) for o in full.outputs)
    assert len(full.outputs[0].logprobs) == len(script) and full.outputs[0].logprobs[0].top_token_ids == [
        script[0], script[0] + 1]
    assert full.num_prompt_tokens == len(tokenizer.encode("Tell me")) and full.num_cached_tokens == 1
    assert sum(d.finish_reason is not None for d in deltas) == 2 and deltas[-1].finished
    assert all(len(d.token_ids) <= 1 for d in deltas)  # one step at a time: a real stream
    h.assert_clean()


def test_async_client_and_token_prompt(h, script):
    async def run():
        async with AsyncClient(h.target, timeout=10) as client:
            pieces = [d.text async for d in client.generate_stream([1, 2, 3], SamplingParams(max_tokens=4))]
            full = await client.generate([1, 2, 3], SamplingParams(max_tokens=4))
            info, _ = await client.model_info()
            return pieces, full, info

    pieces, full, info = h.loop.run(run())  # grpc.aio: one event loop per process
    assert "".join(pieces) == full.text and full.outputs[0].token_ids == script[:4]
    assert info.max_model_len == MODEL_INFO.max_model_len
    h.assert_clean()


def test_eos_stop_token_and_min_tokens(make_server, script):
    h = make_server(engine_script=script[:3] + [EOS] + script[3:])
    client = h.client()
    out = client.generate("x", SamplingParams(max_tokens=50)).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None and out.token_ids[-1] == EOS
    assert out.text == "".join([" The", " answer", " is"])  # the eos token adds no text
    out = client.generate("x", SamplingParams(max_tokens=50, min_tokens=5, stop_token_ids=[script[5]])).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == script[5] and len(out.token_ids) == 7
    out = client.generate("x", SamplingParams(max_tokens=6, ignore_eos=True)).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    h.assert_clean()


@pytest.mark.parametrize("stop,include,expected", [
    ("wer is fo", False, " The ans"),  # starts mid " answer", ends mid " forty"
    ("wer is fo", True, " The answer is fo"),
    ("世界", False, " The answer is forty-two. 你好"),  # multi-byte characters split across tokens
    ("-two. 你", False, " The answer is forty"),
])
def test_stop_string_split_across_tokens(h, stop, include, expected):
    client = h.client()
    params = SamplingParams(max_tokens=40, stop=["never", stop], include_stop_str_in_output=include)
    texts, deltas = drain(client.generate_stream("q", params, request_id="stop-req"))
    assert texts[0] == expected
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    assert all(stop not in d.text for d in deltas[:-1] if not include)
    h.wait_for(lambda e: e.finished_by_frontend == [("stop-req", 0, stop)])
    h.assert_clean()


def test_stop_strings_per_sibling(h):
    params = SamplingParams(n=2, max_tokens=40, stop=["Done"])
    result = h.client().generate("q", params, request_id="two")
    assert [o.text for o in result.outputs] == [" The answer is forty-two. 你好世界! ", " forty-two. 你好世界! "]
    assert [o.stop_reason for o in result.outputs] == ["Done", "Done"]
    assert [o.num_completion_tokens for o in result.outputs] == [len(o.token_ids) for o in result.outputs]
    h.wait_for(lambda e: sorted(e.finished_by_frontend) == [("two", 0, "Done"), ("two", 1, "Done")])
    h.assert_clean()


def test_chat(h, tokenizer):
    client = h.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    result = client.chat(messages, SamplingParams(max_tokens=5), enable_thinking=False)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert result.num_prompt_tokens == len(tokenizer.encode(prompt)) and result.outputs[0].num_completion_tokens == 5
    with pytest.raises(InvalidArgument, match="messages"):
        client.chat([])
    h.assert_clean()


# --- cancellation, abort, deadlines -----------------------------------------------------------

def test_cancel_mid_stream_aborts(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.005})
    client = h.client()
    stream = client.generate_stream("x", SamplingParams(max_tokens=200, ignore_eos=True), request_id="cancel-me")
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    start = time.monotonic()
    h.wait_for(lambda e: "cancel-me" in e.aborted, timeout=2.0)
    h.assert_clean()
    assert time.monotonic() - start < 2.0


def test_async_task_cancel_aborts(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.005})

    async def run():
        async with AsyncClient(h.target) as client:
            async def consume():
                async for _ in client.generate_stream("x", SamplingParams(max_tokens=200, ignore_eos=True),
                                                      request_id="async-cancel"):
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    h.loop.run(run())
    h.wait_for(lambda e: "async-cancel" in e.aborted, timeout=2.0)
    h.assert_clean()


def test_abort_rpc_ends_stream(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.005})
    client = h.client()
    stream = client.generate_stream("x", SamplingParams(max_tokens=200, ignore_eos=True), request_id="ab-1")
    first = next(stream)
    assert client.abort("ab-1") is True
    rest = list(stream)
    assert first.finish_reason is None and rest[-1].finish_reason == "abort"
    assert client.abort("ab-1") is False
    h.assert_clean()


def test_deadline_while_queued(make_server):
    h = make_server()
    h.engine.paused = True
    client = h.client()
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.generate("x", SamplingParams(max_tokens=5), request_id="queued", timeout=0.3)
    assert time.monotonic() - start < 2.0
    h.wait_for(lambda e: "queued" in e.aborted)
    h.assert_clean()


def test_deadline_mid_generation(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.01})
    client = h.client()
    got = []
    with pytest.raises(DeadlineExceeded):
        for delta in client.generate_stream("x", SamplingParams(max_tokens=250, ignore_eos=True),
                                            request_id="slow", timeout=0.4):
            got.append(delta)
    assert got and not got[-1].finished
    h.wait_for(lambda e: "slow" in e.aborted)
    h.assert_clean()


# --- errors -----------------------------------------------------------------------------------

def _sp(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


BAD_GENERATE = [  # (id, GenerateRequest kwargs, field named in the message)
    ("n0", {"sampling_params": _sp(n=0)}, "n"),
    ("n-huge", {"sampling_params": _sp(n=1000)}, "n"),
    ("temp-neg", {"sampling_params": _sp(temperature=-1)}, "temperature"),
    ("temp-nan", {"sampling_params": _sp(temperature=float("nan"))}, "temperature"),
    ("top_p0", {"sampling_params": _sp(top_p=0)}, "top_p"),
    ("top_p-big", {"sampling_params": _sp(top_p=1.5)}, "top_p"),
    ("top_k", {"sampling_params": _sp(top_k=-2)}, "top_k"),
    ("min_p", {"sampling_params": _sp(min_p=2)}, "min_p"),
    ("rep", {"sampling_params": _sp(repetition_penalty=0)}, "repetition_penalty"),
    ("presence", {"sampling_params": _sp(presence_penalty=3)}, "presence_penalty"),
    ("frequency", {"sampling_params": _sp(frequency_penalty=-2.5)}, "frequency_penalty"),
    ("seed", {"sampling_params": _sp(seed=-1)}, "seed"),
    ("max_tokens0", {"sampling_params": _sp(max_tokens=0)}, "max_tokens"),
    ("max_tokens-both", {"sampling_params": _sp(max_tokens=3, no_max_tokens=True)}, "max_tokens"),
    ("min_tokens-neg", {"sampling_params": _sp(min_tokens=-1)}, "min_tokens"),
    ("min>max", {"sampling_params": _sp(min_tokens=10, max_tokens=5)}, "min_tokens"),
    ("stop-empty", {"sampling_params": _sp(stop=[""])}, "stop"),
    ("stop-many", {"sampling_params": _sp(stop=[f"s{i}" for i in range(33)])}, "stop"),
    ("stop-id-neg", {"sampling_params": _sp(stop_token_ids=[-1])}, "stop_token_ids"),
    ("stop-id-vocab", {"sampling_params": _sp(stop_token_ids=[MODEL_INFO.vocab_size])}, "stop_token_ids"),
    ("logprobs-big", {"sampling_params": _sp(logprobs=21)}, "logprobs"),
    ("logprobs-neg", {"sampling_params": _sp(logprobs=-1)}, "logprobs"),
    ("no-input", {}, "prompt"),
    ("prompt-empty", {"prompt": ""}, "prompt"),
    ("ids-empty", {"prompt_token_ids": pb.TokenIds()}, "prompt_token_ids"),
    ("ids-neg", {"prompt_token_ids": pb.TokenIds(ids=[5, -3])}, "prompt_token_ids"),
    ("ids-vocab", {"prompt_token_ids": pb.TokenIds(ids=[MODEL_INFO.vocab_size])}, "prompt_token_ids"),
    ("ids-too-long", {"prompt_token_ids": pb.TokenIds(ids=[7] * 257)}, "257 tokens, over max_model_len (256)"),
    ("text-too-long", {"prompt": "hello " * 300}, "over max_model_len"),
    ("request-id-long", {"prompt": "x", "request_id": "r" * 300}, "request_id"),
]


@pytest.mark.parametrize("kwargs,field", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_requests(h, kwargs, field):
    stub = pb_grpc.LLMServiceStub(grpc.insecure_channel(h.target))
    kwargs = dict(kwargs)
    if list(kwargs) == ["sampling_params"]:
        kwargs["prompt"] = "hi"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**kwargs), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    h.assert_clean()


def test_other_bad_requests(h):
    client = h.client()
    stub = pb_grpc.LLMServiceStub(grpc.insecure_channel(h.target))
    cases = [
        (lambda: list(stub.Chat(pb.ChatRequest(), timeout=5)), "messages"),
        (lambda: list(stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="x")]), timeout=5)),
         "messages[0].role"),
        (lambda: stub.Tokenize(pb.TokenizeRequest(), timeout=5), "text"),
        (lambda: client.detokenize([MODEL_INFO.vocab_size + 5]), "token_ids"),
        (lambda: client.abort(""), "request_id"),
    ]
    for call, field in cases:
        with pytest.raises((grpc.RpcError, InvalidArgument)) as err:
            call()
        code = err.value.code() if callable(err.value.code) else err.value.code
        details = err.value.details() if callable(err.value.details) else err.value.details
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details


def test_duplicate_request_id(make_server):
    h = make_server()
    h.engine.paused = True
    client = h.client()
    first = client.generate_stream("x", SamplingParams(max_tokens=2), request_id="dup", timeout=5)
    thread = threading.Thread(target=lambda: list(first), daemon=True)
    thread.start()
    h.wait_for(lambda e: e.num_requests == 1)
    with pytest.raises(InvalidArgument, match="request_id"):
        client.generate("y", request_id="dup")
    h.engine.paused = False
    thread.join(5)
    h.assert_clean()


@pytest.mark.parametrize("max_concurrent,match", [(2, "1 requests waiting"),  # the engine's bounded queue
                                                   (1, "max_concurrent_requests")])  # the frontend's limit
def test_queue_full_and_concurrency_limit(make_server, max_concurrent, match):
    h = make_server(engine_kwargs={"max_waiting": 1}, max_concurrent_requests=max_concurrent)
    h.engine.paused = True
    client = h.client()
    waiter = threading.Thread(target=lambda: client.generate("a", SamplingParams(max_tokens=2)), daemon=True)
    waiter.start()
    h.wait_for(lambda e: e.num_requests == 1)
    with pytest.raises(ResourceExhausted, match=match):
        client.generate("b")
    assert client.status().num_in_flight == 1
    h.engine.paused = False
    waiter.join(5)
    h.assert_clean()


def test_dead_engine_is_unavailable(make_server):
    h = make_server(engine_kwargs={"step_interval_s": 0.005})
    client = h.client()
    stream = client.generate_stream("x", SamplingParams(max_tokens=200, ignore_eos=True))
    next(stream)
    h.loop.run(h.engine.kill())
    with pytest.raises(Unavailable, match="died"):  # mid-stream
        list(stream)
    with pytest.raises(Unavailable, match="dead"):  # on admission
        client.generate("d")
    h.assert_clean()


def test_fuzz_random_requests_never_crash(make_server):
    from hypothesis import HealthCheck, given, settings, strategies as st

    h = make_server(engine_kwargs={"step_interval_s": 0.0005})
    stub = pb_grpc.LLMServiceStub(h.client()._channel)
    opt_int = lambda lo, hi: st.one_of(st.none(), st.integers(lo, hi))  # noqa: E731
    opt_float = lambda lo, hi: st.one_of(st.none(), st.floats(lo, hi), st.just(float("nan")))  # noqa: E731
    params = st.fixed_dictionaries({}, optional={
        "n": opt_int(-2, 4), "temperature": opt_float(-1, 3), "top_k": opt_int(-3, 50), "top_p": opt_float(-0.5, 1.5),
        "min_p": opt_float(-0.5, 1.5), "repetition_penalty": opt_float(-1, 12),
        "presence_penalty": opt_float(-3, 3), "frequency_penalty": opt_float(-3, 3), "seed": opt_int(-5, 2**63 - 1),
        "max_tokens": opt_int(-1, 12), "min_tokens": opt_int(-1, 12), "no_max_tokens": st.booleans(),
        "stop": st.lists(st.text(max_size=4), max_size=3), "stop_token_ids": st.lists(st.integers(-2, 200000), max_size=3),
        "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(), "logprobs": opt_int(-1, 22),
        "skip_special_tokens": st.booleans()})
    prompt = st.one_of(st.none(), st.text(max_size=40), st.lists(st.integers(-5, 152000), max_size=300))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(prompt=prompt, params=params, request_id=st.text(max_size=8), priority=st.integers(-2**31, 2**31 - 1))
    def check(prompt, params, request_id, priority):
        sp = pb.SamplingParams(**{k: v for k, v in params.items() if v is not None})
        if sp.no_max_tokens and not sp.HasField("max_tokens"):
            sp.max_tokens = 8  # keep the run short: no_max_tokens alone would run to max_model_len
        req = pb.GenerateRequest(request_id=request_id, sampling_params=sp, priority=priority)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt is not None:
            req.prompt_token_ids.ids.extend(prompt)
        try:
            last = list(stub.Generate(req, timeout=10))[-1]
            assert last.HasField("finish_reason")
            outcomes["ok"] += 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            outcomes["invalid"] += 1

    outcomes = collections.Counter()
    check()
    assert outcomes["ok"] >= 5 and outcomes["invalid"] >= 5, outcomes
    h.assert_clean()
    assert h.client().status().any_live  # still serving


# --- security ---------------------------------------------------------------------------------

def test_auth_token(make_server):
    h = make_server(auth_token="s3cret")
    for kwargs in ({}, {"auth_token": "wrong"}):
        with pytest.raises(Unauthenticated):
            h.client(**kwargs).generate("x")
        with pytest.raises(Unauthenticated):
            h.client(**kwargs).model_info()
    assert h.client(auth_token="s3cret").generate("x", SamplingParams(max_tokens=3)).outputs[0].num_completion_tokens == 3
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(h.target))  # exempt: no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status in (
        health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    h.assert_clean()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        return cert, key

    ca, ca_key = make("ca", ca=True)
    make("server", ca.subject, ca_key,
         san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca.subject, ca_key)
    other_ca, other_key = make("other-ca", ca=True)
    make("stranger", other_ca.subject, other_key)
    return {p.stem + "_" + p.suffix[1:]: p for p in out.iterdir()}


def test_tls(make_server, certs):
    h = make_server(tls_cert_file=certs["server_crt"], tls_key_file=certs["server_key"])
    client = h.client(root_certificates=certs["ca_crt"])
    assert client.generate("x", SamplingParams(max_tokens=2)).outputs[0].num_completion_tokens == 2
    with pytest.raises(Unavailable):  # plaintext client against a TLS server
        h.client(timeout=2).model_info()
    with pytest.raises(Unavailable):  # a server certificate the client does not trust
        h.client(root_certificates=certs["other-ca_crt"], timeout=2).model_info()


def test_mutual_tls(make_server, certs):
    h = make_server(tls_cert_file=certs["server_crt"], tls_key_file=certs["server_key"],
                    tls_client_ca_file=certs["ca_crt"], auth_token="tok")
    good = h.client(root_certificates=certs["ca_crt"], client_cert=certs["client_crt"],
                    client_key=certs["client_key"], auth_token="tok")
    assert good.generate("x", SamplingParams(max_tokens=2)).outputs[0].num_completion_tokens == 2
    with pytest.raises(Unavailable):  # no client certificate
        h.client(root_certificates=certs["ca_crt"], auth_token="tok", timeout=2).model_info()
    with pytest.raises(Unavailable):  # a client certificate from another CA
        h.client(root_certificates=certs["ca_crt"], client_cert=certs["stranger_crt"],
                 client_key=certs["stranger_key"], auth_token="tok", timeout=2).model_info()
    h.assert_clean()


# --- operations -------------------------------------------------------------------------------

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
