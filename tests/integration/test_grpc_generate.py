"""The gRPC front door, generation: streamed vs whole output, eos/stop tokens, stop strings, chat,
cancellation, abort, deadlines, backpressure and a dead engine. Against a fake engine and the real Qwen3
tokenizer, on loopback only; the harness and fixtures are in grpc_fixtures.py and conftest.py.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cluster.client import AsyncClient, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from scheduler.sampling_params import SamplingParams

try:
    from tests.integration.grpc_fixtures import EOS, MODEL_INFO, SCRIPT_TEXT, drain
except ImportError:  # collected with tests/integration on sys.path (rootdir-less runs)
    from grpc_fixtures import EOS, MODEL_INFO, SCRIPT_TEXT, drain

pytestmark = pytest.mark.slow  # a real tokenizer and ~20 servers


# --- generation -------------------------------------------------------------------------------

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


# --- backpressure and a dead engine -----------------------------------------------------------

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
