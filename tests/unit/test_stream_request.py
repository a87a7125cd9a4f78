"""stream_request: the request goes into the engine first; its detokenizer starts after, while the
engine works, and a request whose frontend side fails to start is aborted, not left running."""
import asyncio

import pytest

from cluster.output_processor import stream_request
from scheduler.output import EngineCoreOutput
from scheduler.sampling_params import SamplingParams


class _Tokenizer:
    def __init__(self, log: list, fail: bool = False):
        self.log, self.fail = log, fail

    def decode(self, ids, skip_special_tokens=True):
        if self.fail:
            raise RuntimeError("tokenizer broke")
        self.log.append("decode")
        return "".join(chr(ord("a") + i % 26) for i in ids)


class _Engine:
    def __init__(self, log: list):
        self.log = log

    async def add_request(self, request_id, prompt_token_ids, sampling_params, priority=0):
        self.log.append("add")

        async def outputs():
            yield [EngineCoreOutput(request_id, 0, [3], finish_reason="length", num_prompt_tokens=len(prompt_token_ids))]
        return outputs()

    async def finish(self, request_id, index, stop_reason):
        self.log.append("finish")

    async def abort(self, request_id):
        self.log.append("abort")


async def _collect(engine, tokenizer):
    deltas = []
    async for step in stream_request(engine, "r", [0, 1, 2], SamplingParams(max_tokens=1), tokenizer):
        deltas.extend(step)
    return deltas


def test_the_request_reaches_the_engine_before_its_detokenizer_starts():
    log = []
    deltas = asyncio.run(_collect(_Engine(log), _Tokenizer(log)))
    assert log[0] == "add" and "decode" in log and "abort" not in log
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [("d", [3], "length")]


def test_a_frontend_that_cannot_start_the_detokenizer_aborts_the_request():
    log = []
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        asyncio.run(_collect(_Engine(log), _Tokenizer(log, fail=True)))
    assert log == ["add", "abort"]
