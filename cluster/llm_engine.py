"""LLMEngine: the synchronous in-process engine behind the offline LLM API.

Tokenize, queue, step the EngineCore, and turn its token outputs into text with the same
RequestOutputProcessor the gRPC frontend uses.
"""
import itertools
import time

from cluster.config import EngineConfig
from cluster.engine_core import EngineCore, Replica
from cluster.local_executor import LocalExecutor
from cluster.model_info import ResolvedModel, resolve
from cluster.output_processor import RequestDelta, RequestOutputProcessor
from cluster.outputs import CompletionOutput, RequestMetrics, RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler
from scheduler.token_ids import check_and_pack_token_ids, unpack_token_ids
from workers.gc_freeze import freeze_startup_objects
from workers.tokenizer import load_tokenizer
from workers.worker import Worker


def build_scheduler(config: EngineConfig, model: ResolvedModel, num_blocks: int) -> Scheduler:
    return Scheduler(config.scheduler, config.cache, num_blocks, model.max_model_len, model.eos_token_ids)


def build_local_worker(config: EngineConfig, model: ResolvedModel) -> Worker:
    worker = Worker(config.model, config.cache, config.scheduler, model.hf_config, model.max_model_len,
                    model.eos_token_ids, config.runtime.device, attention_backend=config.runtime.attention_backend,
                    enforce_eager=config.runtime.enforce_eager)
    worker.load_model()
    worker.init_kv_cache(worker.determine_num_blocks())
    return worker


class _Tracked:
    """A request's RequestOutput and its RequestOutputProcessor, made by build(): neither is needed
    to launch the request's first step, so the engine builds them while the device runs it (a
    2k-token prompt's detokenizer, output objects and plain-int prompt ids were ~60 us of a warm
    prefix hit's host time before its launch, in place on the CPU machine), or at its first
    output at the latest."""

    __slots__ = ("request_id", "prompt", "token_ids", "packed", "params", "arrival_time", "output",
                 "processor")

    def __init__(self, request_id: str, prompt: str | list[int], token_ids: list[int], packed: bytes | None,
                 params: SamplingParams, arrival_time: float):
        """token_ids and packed as LLMEngine._tokenize gives them."""
        self.request_id, self.prompt, self.token_ids, self.packed = request_id, prompt, token_ids, packed
        self.params, self.arrival_time = params, arrival_time
        self.output: RequestOutput | None = None
        self.processor: RequestOutputProcessor | None = None

    def build(self, tokenizer) -> "_Tracked":
        if self.processor is None:
            params = self.params
            # ids the caller gave are shown back as plain ints, whatever integer type came in
            token_ids = self.token_ids if self.packed is None else unpack_token_ids(self.packed)
            completions = [CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                            [] if params.logprobs is not None else None) for i in range(params.n)]
            prompt = self.prompt if isinstance(self.prompt, str) else None
            self.output = RequestOutput(self.request_id, prompt, token_ids, completions, False,
                                        RequestMetrics(self.arrival_time))
            self.processor = RequestOutputProcessor(self.request_id, token_ids, params, tokenizer,
                                                    defer_text=True)
        return self


class LLMEngine:
    """One replica in this process, or (data/tensor parallel, or use_ray) the Ray engine."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = resolve(config)
        self.vocab_size = self.model.hf_config.vocab_size  # read per request; a config attribute costs ~1 us
        self.tokenizer = load_tokenizer(self.model.tokenizer_name, config.model.revision)
        self.worker: Worker | None = None
        if config.wants_ray:
            from cluster.ray_engine_core import RayEngineCore

            self.core = RayEngineCore.launch(config)
        else:
            self.worker = build_local_worker(config, self.model)
            scheduler = build_scheduler(config, self.model, self.worker.runner.num_blocks)
            self.core = EngineCore([Replica(0, scheduler, LocalExecutor(self.worker))],
                                   async_scheduling=config.runtime.async_scheduling)
        self._tracked: dict[str, _Tracked] = {}
        self._unbuilt: list[_Tracked] = []  # added since the last step; build() while the device runs
        self._ids = itertools.count()
        freeze_startup_objects()  # the in-process worker's state with the rest; Ray workers freeze their own

    @property
    def scheduler(self) -> Scheduler:
        """The in-process replica's scheduler (tests read its block manager)."""
        if self.worker is None:
            raise AttributeError("a Ray engine's schedulers live in its SchedulerActor")
        return self.core.replicas[0].scheduler

    def shutdown(self) -> None:
        if hasattr(self.core, "shutdown"):
            self.core.shutdown()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's ids as plain ints (ids given are checked)."""
        token_ids, packed = self._tokenize(prompt)
        return token_ids if packed is None else unpack_token_ids(packed)

    def _tokenize(self, prompt: str | list[int]) -> tuple[list[int], bytes | None]:
        """The prompt's ids, and for ids given by the caller their packing (the scheduler's prefix
        cache keys) from the same check; such a list holds the caller's own integer objects
        (check_and_pack_token_ids), made plain ints only where shown back (_Tracked.build)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False), None
        return check_and_pack_token_ids(prompt, self.vocab_size)

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        return self.add_requests([prompt], [sampling_params], [request_id], priority)[0]

    def add_requests(self, prompts: list[str | list[int]], sampling_params: list[SamplingParams | None],
                     request_ids: list[str | None] | None = None, priority: int = 0) -> list[str]:
        """Queue several requests at once, all or none (the Ray engine admits them in one batch)."""
        request_ids = request_ids or [None] * len(prompts)
        batch = []
        now = time.monotonic()
        for prompt, params, request_id in zip(prompts, sampling_params, request_ids):
            params = params or SamplingParams()
            params.check_vocab(self.vocab_size)
            request_id = request_id if request_id is not None else str(next(self._ids))
            token_ids, packed = self._tokenize(prompt)
            batch.append((request_id, token_ids, params, priority, now, packed))
        self.core.add_requests(batch)
        for (request_id, token_ids, params, _, _, packed), prompt in zip(batch, prompts):
            self._tracked[request_id] = tracked = _Tracked(request_id, prompt, token_ids, packed, params, now)
            self._unbuilt.append(tracked)
        return [r[0] for r in batch]

    def abort_request(self, request_id: str) -> None:
        self._apply(self.core.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that made progress (finished ones for the last time)."""
        return self._apply(self.core.step(self._build_tracked))

    def _build_tracked(self) -> None:
        unbuilt, self._unbuilt = self._unbuilt, []
        for tracked in unbuilt:
            tracked.build(self.tokenizer)

    def _apply(self, engine_outputs) -> list[RequestOutput]:
        by_request: dict[str, list] = {}
        updated: dict[str, RequestOutput] = {}
        now = time.monotonic()
        for out in engine_outputs:
            tracked = self._tracked.get(out.req_id)
            if tracked is not None and tracked.build(self.tokenizer).processor.keep_deferred(out):  # most decode steps
                tracked.output.outputs[out.index].token_ids.extend(out.new_token_ids)
                if tracked.output.metrics.first_token_time is None:
                    tracked.output.metrics.first_token_time = now
                    tracked.output.metrics.num_cached_tokens = out.num_cached_tokens
                updated[out.req_id] = tracked.output
            else:
                by_request.setdefault(out.req_id, []).append(out)
        for request_id, outs in by_request.items():
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            deltas, stops = tracked.processor.process(outs)
            for stop in stops:
                self.core.finish(request_id, stop.index, stop.stop_str)
            _merge(tracked.output, deltas)
            if tracked.processor.finished:
                tracked.output.finished = True
                tracked.output.metrics.finished_time = time.monotonic()
                del self._tracked[request_id]
            updated[request_id] = tracked.output
        return list(updated.values())


def _merge(output: RequestOutput, deltas: list[RequestDelta]) -> None:
    now = time.monotonic()
    for d in deltas:
        c = output.outputs[d.index]
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None and c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
            c.cumulative_logprob += sum(lp.logprob for lp in d.logprobs)
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        output.metrics.num_cached_tokens = d.num_cached_tokens
        if d.token_ids and output.metrics.first_token_time is None:
            output.metrics.first_token_time = now
