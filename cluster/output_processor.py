"""Frontend side of a request: engine steps (token ids) in, text deltas per sibling out.

Independent of gRPC so that the offline LLM class can reuse it. The engine knows nothing of text:
here each sibling is detokenized incrementally, stop strings are matched (and the engine told via
finish), and usage is counted.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

from cluster.engine_types import EngineClientProtocol, open_output_stream
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.output import EngineCoreOutput, TokenLogprobs
from scheduler.sampling_params import SamplingParams


@dataclass
class RequestDelta:
    """What one sibling added in one step. finish_reason is set on its last delta only."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # stop token id or stop string
    num_prompt_tokens: int
    num_completion_tokens: int  # so far, for this sibling
    num_cached_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StopMatch:
    """A stop string matched in the frontend; the engine must stop the sibling (engine.finish)."""

    index: int
    stop_str: str


@dataclass
class _Sibling:
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)  # all of them, for callers that want them
    num_detokenized: int = 0  # token_ids[:num_detokenized] went through the detokenizer


class RequestOutputProcessor:
    """One request's siblings: turns each engine step's EngineCoreOutputs into RequestDeltas."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                 tokenizer, detokenizer_factory: Callable[..., IncrementalDetokenizer] = IncrementalDetokenizer,
                 defer_text: bool = False):
        self.request_id = request_id
        # A caller that reads text only at the end (the offline LLM) skips per-step detokenizing
        # when no stop string needs matching: one decode at the end gives the same text, and
        # per-token decodes would cost more host time than a small model's decode step.
        self.defer_text = defer_text and not sampling_params.stop
        self.params = sampling_params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self._siblings = [
            _Sibling(detokenizer_factory(tokenizer, prompt_token_ids, sampling_params.skip_special_tokens,
                                         sampling_params.stop, sampling_params.include_stop_str_in_output))
            for _ in range(sampling_params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self._siblings)

    @property
    def num_completion_tokens(self) -> int:
        return sum(s.num_tokens for s in self._siblings)

    def keep_deferred(self, out: EngineCoreOutput) -> bool:
        """defer_text: hold an unfinished step's tokens for the final decode, no delta made.

        The offline engine's per-step fast path (a delta per sequence per step costs more host
        time than a small model's decode step); False where process() has work to do.
        """
        if not self.defer_text or out.finished or out.new_logprobs is not None:
            return False
        sib = self._siblings[out.index]
        sib.token_ids.extend(out.new_token_ids)
        sib.num_tokens += len(out.new_token_ids)
        return True

    def process(self, outputs: Sequence[EngineCoreOutput]) -> tuple[list[RequestDelta], list[StopMatch]]:
        deltas, stops = [], []
        for out in outputs:
            if out.num_prompt_tokens:
                self.num_prompt_tokens = out.num_prompt_tokens
            self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
            if not 0 <= out.index < len(self._siblings) or self._siblings[out.index].finish_reason:
                continue  # already ended here (a stop string), or not ours: later steps are moot
            delta = self._process_one(out)
            if delta is not None:
                deltas.append(delta)
                if isinstance(delta.stop_reason, str) and out.finish_reason is None:
                    stops.append(StopMatch(out.index, delta.stop_reason))
        return deltas, stops

    def finish_unfinished(self, finish_reason: str = "abort") -> list[RequestDelta]:
        """Final deltas for siblings the engine ended without saying how (an aborted stream)."""
        deltas = []
        for index, sib in enumerate(self._siblings):
            if sib.finish_reason is None:
                sib.finish_reason = finish_reason
                pending = sib.token_ids[sib.num_detokenized:]
                sib.num_detokenized = len(sib.token_ids)
                text = sib.detokenizer.append(pending, finished=True).text
                deltas.append(self._delta(index, text, [], None, finish_reason, None))
        return deltas

    def _process_one(self, out: EngineCoreOutput) -> RequestDelta | None:
        sib = self._siblings[out.index]
        token_ids = list(out.new_token_ids)
        logprobs = list(out.new_logprobs) if out.new_logprobs is not None else None
        on_stop_token = (out.finish_reason == "stop" and bool(token_ids)
                         and not isinstance(out.stop_reason, str))  # eos or stop_token_ids
        if self.defer_text and not out.finished:
            text, stop_str = "", None
        elif self.defer_text:
            pending = sib.token_ids[sib.num_detokenized:] + token_ids
            det = sib.detokenizer.append(pending, finished=True, stop_token_terminated=on_stop_token)
            text, stop_str = det.text, det.stop_str
        elif self.params.stop and len(token_ids) > 1:
            text, stop_str, token_ids = self._append_one_by_one(sib, token_ids, out, on_stop_token)
        else:
            det = sib.detokenizer.append(token_ids, finished=out.finished, stop_token_terminated=on_stop_token)
            text, stop_str = det.text, det.stop_str
        if logprobs is not None:
            logprobs = logprobs[:len(token_ids)]
        sib.num_tokens += len(token_ids)
        sib.token_ids.extend(token_ids)
        if not self.defer_text or out.finished:
            sib.num_detokenized = len(sib.token_ids)
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if stop_str is not None:
            finish_reason, stop_reason = "stop", stop_str
        if finish_reason is None and not text and not token_ids:
            return None
        sib.finish_reason = finish_reason
        return self._delta(out.index, text, token_ids, logprobs, finish_reason, stop_reason)

    def _append_one_by_one(self, sib: _Sibling, token_ids: list[int], out: EngineCoreOutput,
                           on_stop_token: bool) -> tuple[str, str | None, list[int]]:
        """Several tokens in one step with stop strings set: find the token that completes a
        match, so that token_ids and usage end there too."""
        text = []
        for i, token_id in enumerate(token_ids):
            last = i == len(token_ids) - 1
            det = sib.detokenizer.append([token_id], finished=last and out.finished,
                                         stop_token_terminated=last and on_stop_token)
            text.append(det.text)
            if det.stop_str is not None:
                return "".join(text), det.stop_str, token_ids[:i + 1]
        return "".join(text), None, token_ids

    def _delta(self, index, text, token_ids, logprobs, finish_reason, stop_reason) -> RequestDelta:
        return RequestDelta(
            request_id=self.request_id, index=index, text=text, token_ids=token_ids,
            logprobs=logprobs if self.params.logprobs is not None else None,
            finish_reason=finish_reason, stop_reason=stop_reason,
            num_prompt_tokens=self.num_prompt_tokens, num_completion_tokens=self._siblings[index].num_tokens,
            num_cached_tokens=self.num_cached_tokens)


async def stream_request(engine: EngineClientProtocol, request_id: str, prompt_token_ids: list[int],
                         sampling_params: SamplingParams, tokenizer,
                         priority: int = 0) -> AsyncIterator[list[RequestDelta]]:
    """Submit a request and yield its deltas, one list per engine step that produced any.

    Raises what engine.add_request raises (before the first yield). Every sibling's last delta has
    finish_reason. If the caller stops early (break, cancellation, deadline) the request is
    aborted in the engine, so its blocks are freed: close the generator (contextlib.aclosing)
    rather than leaving that to garbage collection.
    """
    try:
        stream = await open_output_stream(engine, request_id, prompt_token_ids, sampling_params, priority)
    except asyncio.CancelledError:  # the caller left while the engine was admitting the request
        await asyncio.shield(engine.abort(request_id))
        raise
    processor = None
    try:
        # made once the request is in the engine, which schedules it meanwhile: the detokenizer's
        # start (a decode of the prompt's tail) is no part of the request's way in
        processor = RequestOutputProcessor(request_id, prompt_token_ids, sampling_params, tokenizer)
        async for outputs in stream:
            deltas, stops = processor.process(outputs)
            for stop in stops:
                await engine.finish(request_id, stop.index, stop.stop_str)
            if deltas:
                yield deltas
            if processor.finished:
                break
        tail = processor.finish_unfinished("abort")  # the engine ended the stream early
        if tail:
            yield tail
    finally:
        if processor is None or not processor.finished:
            await asyncio.shield(engine.abort(request_id))
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
