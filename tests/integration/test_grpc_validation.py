"""The gRPC front door, bad input: every invalid request is INVALID_ARGUMENT naming the field, and
random requests (hypothesis) never crash the server or leak blocks. Against a fake engine and the real
Qwen3 tokenizer, on loopback only; the harness and fixtures are in grpc_fixtures.py and conftest.py.
"""
from __future__ import annotations

import collections
import threading

import grpc
import pytest

from cluster.client import InvalidArgument
from protos.folovllm.v1 import llm_pb2 as pb
from protos.folovllm.v1 import llm_pb2_grpc as pb_grpc
from scheduler.sampling_params import SamplingParams

try:
    from tests.integration.grpc_fixtures import MODEL_INFO
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from grpc_fixtures import MODEL_INFO

pytestmark = pytest.mark.slow  # ~30 servers and a fuzz run


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
