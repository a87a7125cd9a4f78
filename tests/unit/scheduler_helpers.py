"""Helpers for scheduler tests: create_scheduler() and create_requests() (vLLM v1 style), and a
fake model runner that keeps the step contract the way a worker does.

The fake runner holds per-sequence state built from the step diffs, writes (position, token) into
a fake paged KV cache, reads the whole context back through its block table before sampling, and
samples next = f(context, sibling index). So a wrong block table, a prefix-cache hit on the wrong
block, a block reused while still held, or a write into a shared block fails loudly, and any
scheduling of the same requests must produce the same tokens.
"""
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler

EOS = 1
VOCAB = 1000
FIRST_TOKEN = 10  # fake prompts and samples stay >= this, clear of EOS and test stop ids

_SCHEDULER_FIELDS = set(SchedulerConfig.model_fields)
_CACHE_FIELDS = set(CacheConfig.model_fields)


def create_scheduler(**overrides) -> Scheduler:
    """A small scheduler: block_size 4, 256 blocks, budget 64 tokens, 16 sequences, fcfs.

    Any SchedulerConfig or CacheConfig field, or num_gpu_blocks, max_model_len, eos_token_ids.
    """
    values = dict(block_size=4, num_gpu_blocks=256, max_model_len=256, eos_token_ids=[EOS],
                  max_num_seqs=16, max_num_batched_tokens=64)
    values.update(overrides)
    sched = {k: v for k, v in values.items() if k in _SCHEDULER_FIELDS}
    cache = {k: v for k, v in values.items() if k in _CACHE_FIELDS and k != "num_gpu_blocks"}
    unknown = set(values) - _SCHEDULER_FIELDS - _CACHE_FIELDS - {"max_model_len", "eos_token_ids"}
    assert not unknown, f"unknown overrides {unknown}"
    return Scheduler(SchedulerConfig(**sched), CacheConfig(**cache), values["num_gpu_blocks"],
                     values["max_model_len"], values["eos_token_ids"])


@dataclass
class RequestSpec:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float | None = None


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(n)]


def create_requests(num: int, prompt_len: int = 8, max_tokens: int | None = 16, *, prefix: list[int] = (),
                    id_prefix: str = "req", start: int = 0, priority: int = 0, **sampling) -> list[RequestSpec]:
    """num requests with distinct random prompts (after a shared `prefix`), arriving in order."""
    specs = []
    for i in range(start, start + num):
        prompt = list(prefix) + random_tokens(prompt_len - len(prefix), seed=zlib.crc32(f"{id_prefix}{i}".encode()))
        params = SamplingParams(max_tokens=max_tokens, **sampling)
        specs.append(RequestSpec(f"{id_prefix}{i}", prompt, params, priority, arrival_time=float(i)))
    return specs


def add_requests(scheduler: Scheduler, specs: list[RequestSpec]) -> None:
    for s in specs:
        scheduler.add_request(s.req_id, s.prompt_token_ids, s.sampling_params, s.priority, s.arrival_time)


def default_next_token(context: list[int], sibling_index: int) -> int:
    span = VOCAB - FIRST_TOKEN
    return FIRST_TOKEN + (context[-1] * 31 + len(context) * 7 + sibling_index * 101) % span


@dataclass
class _SeqState:
    tokens: list[int]
    sibling_index: int
    block_ids: list[int]
    num_computed: int


class FakeModelRunner:
    def __init__(self, block_size: int = 4,
                 next_token: Callable[[list[int], int], int] = default_next_token):
        self.block_size = block_size
        self.next_token = next_token
        self.seqs: dict[str, _SeqState] = {}
        self.holders: dict[int, set[str]] = {}  # block id -> live sequences whose table has it
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}  # (block, offset) -> (position, token)

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        for seq_id in step.finished_req_ids:
            state = self.seqs.pop(seq_id, None)
            for block_id in state.block_ids if state else ():
                self.holders[block_id].discard(seq_id)
        for new in step.scheduled_new_reqs:
            assert new.req_id not in self.seqs, f"{new.req_id} sent in full while the replica holds it"
            self.seqs[new.req_id] = _SeqState(list(new.prompt_token_ids) + list(new.output_token_ids),
                                              new.sibling_index, [], new.num_computed_tokens)
            self._add_blocks(new.req_id, new.block_ids)
        cached = step.scheduled_cached_reqs
        for seq_id, block_ids, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            assert self.seqs[seq_id].num_computed == computed, f"{seq_id}: num_computed_tokens diverged"
            self._add_blocks(seq_id, block_ids)
        scheduled = [n.req_id for n in step.scheduled_new_reqs] + cached.req_ids
        assert sorted(scheduled) == sorted(step.num_scheduled_tokens), "scheduled ids and token counts disagree"
        assert step.total_num_scheduled_tokens == sum(step.num_scheduled_tokens.values())
        req_ids, sampled = [], []
        for seq_id, num_tokens in step.num_scheduled_tokens.items():
            req_ids.append(seq_id)
            if step.decode_steps > 1:  # multi-step: one token a pass, each fed the one sampled before
                assert num_tokens <= step.decode_steps, f"{seq_id}: more tokens than passes"
                sampled.append([t for _ in range(num_tokens) for t in self._run(seq_id, 1)])
            else:
                sampled.append(self._run(seq_id, num_tokens))
        return ModelRunnerOutput(req_ids, sampled)

    def _add_blocks(self, seq_id: str, block_ids: list[int]) -> None:
        self.seqs[seq_id].block_ids.extend(block_ids)
        for block_id in block_ids:
            self.holders.setdefault(block_id, set()).add(seq_id)

    def _run(self, seq_id: str, num_tokens: int) -> list[int]:
        state, bs = self.seqs[seq_id], self.block_size
        start, end = state.num_computed, state.num_computed + num_tokens
        assert 0 < num_tokens and end <= len(state.tokens), f"{seq_id}: scheduled past its tokens"
        assert len(state.block_ids) * bs >= end, f"{seq_id}: block table too short for {end} tokens"
        for pos in range(start, end):
            block_id = state.block_ids[pos // bs]
            assert self.holders[block_id] == {seq_id}, f"{seq_id} writes shared block {block_id}"
            self.kv[(block_id, pos % bs)] = (pos, state.tokens[pos])
        state.num_computed = end
        if end < len(state.tokens):
            return []  # a partial prefill samples nothing
        context = [self.kv.get((state.block_ids[p // bs], p % bs)) for p in range(end)]
        assert context == list(enumerate(state.tokens)), f"{seq_id}: KV cache does not hold its context"
        token = self.next_token(state.tokens, state.sibling_index)
        state.tokens.append(token)
        return [token]


@dataclass
class SeqResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


def collect(results: dict[tuple[str, int], SeqResult], outputs: list[EngineCoreOutput]) -> None:
    for out in outputs:
        result = results.setdefault((out.req_id, out.index), SeqResult())
        assert result.finish_reason is None, f"{out.req_id}[{out.index}] produced output after finishing"
        result.token_ids.extend(out.new_token_ids)
        result.finish_reason, result.stop_reason = out.finish_reason, out.stop_reason
        result.num_cached_tokens = out.num_cached_tokens


def check_step(scheduler: Scheduler, step: SchedulerOutput) -> None:
    cfg = scheduler.config
    assert step.total_num_scheduled_tokens <= cfg.max_num_batched_tokens, "token budget exceeded"
    assert len(step.num_scheduled_tokens) <= cfg.max_num_seqs, "max_num_seqs exceeded"
    assert all(n > 0 for n in step.num_scheduled_tokens.values()), "a sequence scheduled with no tokens"
    assert len(scheduler.running) <= cfg.max_num_seqs


def step_once(scheduler: Scheduler, runner: FakeModelRunner, results: dict | None = None):
    """One step -> (SchedulerOutput, outputs); outputs are also collected into results when given."""
    step = scheduler.schedule()
    check_step(scheduler, step)
    outputs = scheduler.update_from_output(step, runner.execute_model(step))
    if results is not None:
        collect(results, outputs)
    return step, outputs


def tokens_of(results: dict[tuple[str, int], SeqResult]) -> dict[tuple[str, int], list[int]]:
    return {key: r.token_ids for key, r in results.items()}


def run_steps(scheduler: Scheduler, runner: FakeModelRunner, num_steps: int,
              results: dict | None = None) -> dict[tuple[str, int], SeqResult]:
    results = {} if results is None else results
    for _ in range(num_steps):
        step_once(scheduler, runner, results)
    return results


def run_to_completion(scheduler: Scheduler, runner: FakeModelRunner | None = None, max_steps: int = 5000,
                      results: dict | None = None) -> dict[tuple[str, int], SeqResult]:
    """Drive schedule()/update_from_output() until every request finishes; checks each step."""
    runner = runner or FakeModelRunner(scheduler.block_size)
    results = {} if results is None else results
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return results
        run_steps(scheduler, runner, 1, results)
    raise AssertionError(f"not finished after {max_steps} steps: {list(scheduler.requests)}")


def run_overlapped(scheduler: Scheduler, runner: FakeModelRunner | None = None, max_steps: int = 5000,
                   results: dict | None = None, on_step: Callable | None = None) -> dict[tuple[str, int], SeqResult]:
    """Like run_to_completion, but step N+1 is scheduled (and run by the replica, which executes
    steps in order) before step N's output reaches the scheduler, as the Ray engine does."""
    runner = runner or FakeModelRunner(scheduler.block_size)
    results = {} if results is None else results
    inflight: list[tuple[SchedulerOutput, ModelRunnerOutput]] = []
    for n in range(max_steps):
        while len(inflight) < 2 and scheduler.has_unfinished_requests():
            step = scheduler.schedule()
            check_step(scheduler, step)
            if step.is_empty:
                break
            inflight.append((step, runner.execute_model(step)))
        if not inflight:
            return results
        # as EngineCore.step does while the device runs (run_to_completion leaves every released
        # block to the allocations that need it)
        scheduler.return_released_blocks()
        step, output = inflight.pop(0)
        collect(results, scheduler.update_from_output(step, output))
        if on_step is not None:
            on_step(n, scheduler)
    raise AssertionError(f"not finished after {max_steps} steps: {list(scheduler.requests)}")


def random_workload(rng: random.Random, id_prefix: str) -> tuple[list[RequestSpec], dict, dict]:
    """(specs, knobs of a roomy scheduler, extra knobs of a tight one that chunks and preempts)."""
    specs = [spec for i in range(rng.randint(3, 10)) for spec in create_requests(
        1, prompt_len=rng.randint(9, 30), max_tokens=rng.randint(1, 20), n=rng.choice([1, 1, 2, 3]),
        start=i, priority=rng.randint(0, 2), id_prefix=id_prefix, prefix=[7] * rng.choice([0, 4, 9]),
        min_tokens=rng.choice([0, 0, 1]))]
    knobs = dict(enable_prefix_caching=rng.random() < 0.7, enable_chunked_prefill=rng.random() < 0.7,
                 policy=rng.choice(["fcfs", "priority"]), block_size=rng.choice([1, 2, 4, 8]), max_model_len=48,
                 eos_token_ids=[EOS] + rng.sample(range(10, 1000), 5))  # some sequences stop early
    tight = dict(num_gpu_blocks=rng.randint(48, 96) // knobs["block_size"], max_num_seqs=rng.randint(1, 6),
                 max_num_batched_tokens=rng.randint(48, 64))
    return specs, knobs, tight
