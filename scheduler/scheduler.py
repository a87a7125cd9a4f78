"""The scheduler: one token budget per step, shared by decodes, prefill chunks and recomputation.

There is no prefill or decode phase. Every sequence has num_computed_tokens catching up to its
num_tokens; a step gives each some of the budget, running ones first (in policy order), then
waiting ones. Chunked prefill, prefix caching (computed tokens start at the cached length) and
preemption by recompute (computed tokens go back to the cached length) all fall out of that.

num_computed_tokens advances when a step is scheduled; blocks become findable in the prefix
cache only when the step's output comes back, so nothing ever reads KV that is still unwritten.
"""
import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.block_manager import BlockManager
from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.errors import InvalidRequestError, QueueFullError
from scheduler.multi_step import extend_decodes
from scheduler.output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                              SchedulerOutput, TokenLogprobs)
from scheduler.policy import WaitingQueue, get_policy
from scheduler.request import Request, RequestStatus, Sequence
from scheduler.sampling_params import SamplingParams
from scheduler.stop_checks import check_stop, no_stop_among


@dataclass
class SchedulerStats:
    num_running: int  # sequences holding blocks on the replica
    num_waiting: int  # sequences queued, preempted or waiting for their first sibling
    kv_cache_usage: float  # fraction of blocks referenced
    prefix_cache_queries: int  # tokens looked up on admission
    prefix_cache_hits: int  # of those, tokens served from the cache
    prefix_cache_hit_rate: float
    num_preemptions: int


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_gpu_blocks: int,
                 max_model_len: int, eos_token_ids: list[int]):
        if not scheduler_config.enable_chunked_prefill and scheduler_config.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) must be >= max_model_len "
                f"({max_model_len}) when enable_chunked_prefill is false, or a long sequence could never run")
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.block_manager = BlockManager(num_gpu_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.max_model_len = max_model_len
        # A sequence also stops at the size of the whole cache, so that one left alone can always
        # make progress instead of preempting itself forever.
        self.max_seq_len = min(max_model_len, num_gpu_blocks * cache_config.block_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.policy_key = get_policy(scheduler_config.policy)
        self.waiting = WaitingQueue(self.policy_key)
        self.running: list[Sequence] = []  # sorted by policy_key: the tail is the preemption victim
        self.requests: dict[str, Request] = {}  # unfinished requests
        self.seqs: dict[str, Sequence] = {}  # unfinished sequences by seq id
        self.finished_seq_ids: list[str] = []  # replica-side state to drop in the next step
        self.num_preemptions = 0
        self._order = itertools.count()
        self._step_id = 0
        # step id -> the Sequence objects it scheduled, until its output is applied: a step's
        # output must never reach a newer sequence that reuses a finished one's id
        self._scheduled: dict[int, dict[str, Sequence]] = {}

    # ---- requests in and out --------------------------------------------------------------
    def add_request(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    packed_prompt: bytes | None = None) -> None:
        """Queue a request; raises InvalidRequestError naming the bad field, or QueueFullError.
        packed_prompt: the prompt as check_and_pack_token_ids packs it, when the caller checked it so.

        The queue limit counts waiting sequences (preempted ones included): a queue clogged by
        preemptions refuses new work too.
        """
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError("sampling_params",
                                      f"must be a SamplingParams, got {type(sampling_params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority", f"must be an integer, got {priority!r}")
        self._check_new(req_id, prompt_token_ids)
        if len(self.waiting) >= self.config.max_queued_requests:
            raise QueueFullError(f"{len(self.waiting)} sequences are waiting "
                                 f"(max_queued_requests={self.config.max_queued_requests}); retry later")
        self._enqueue(Request(req_id, list(prompt_token_ids), sampling_params, priority, arrival_time, packed_prompt))

    def add_resumed(self, request: Request) -> None:
        """Take a request drained from another replica; it recomputes, keeping its output tokens.

        Never refused for a full queue: the work was already admitted once.
        """
        self._check_new(request.req_id, request.prompt_token_ids)
        self._enqueue(request)

    def _check_new(self, req_id: str, prompt_token_ids: list[int]) -> None:
        if not isinstance(req_id, str) or not req_id:
            raise InvalidRequestError("request_id", f"must be a non-empty string, got {req_id!r}")
        if req_id in self.requests:
            raise InvalidRequestError("request_id", f"{req_id!r} is already in use by an unfinished request")
        num_prompt, num_blocks = len(prompt_token_ids), self.block_manager.num_blocks
        if num_prompt == 0:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        if num_prompt > self.max_model_len:
            raise InvalidRequestError("prompt_token_ids", f"the prompt has {num_prompt} tokens, "
                                                          f"longer than max_model_len {self.max_model_len}")
        if self.block_manager.num_blocks_for(num_prompt) > num_blocks:
            needed = self.block_manager.num_blocks_for(num_prompt)
            raise InvalidRequestError("prompt_token_ids", f"the prompt has {num_prompt} tokens and needs {needed} "
                                                          f"KV blocks; the whole cache has {num_blocks}")

    def _enqueue(self, request: Request) -> None:
        self.requests[request.req_id] = request
        for seq in request.unfinished_seqs():
            seq.order = next(self._order)
            self.seqs[seq.seq_id] = seq
            if seq not in request.pending_siblings:
                self.waiting.push(seq)

    def abort_requests(self, req_ids: str | Iterable[str]) -> list[EngineCoreOutput]:
        """Abort requests (unknown or finished ids are ignored); blocks are freed now.

        Returns one finished "abort" output per sibling that was still unfinished; they are not
        emitted again by update_from_output.
        """
        if isinstance(req_ids, str):
            req_ids = [req_ids]
        requests = [self.requests[req_id] for req_id in req_ids if req_id in self.requests]
        for request in requests:
            request.pending_siblings = []  # all of them are aborted below
        seqs = [seq for request in requests for seq in request.unfinished_seqs()]
        self.waiting.remove({seq for seq in seqs if seq.status is not RequestStatus.RUNNING})
        outputs = []
        for seq in seqs:
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(seq, [], None))
        return outputs

    def finish_request(self, req_id: str, index: int, stop_reason: int | str | None) -> None:
        """The frontend matched a stop string in sibling `index`: stop it (no-op if already done)."""
        request = self.requests.get(req_id)
        if request is None or not 0 <= index < len(request.seqs) or request.seqs[index].is_finished:
            return
        seq = request.seqs[index]
        if seq.status is not RequestStatus.RUNNING:
            self.waiting.remove({seq})
        seq.stop_reason = stop_reason
        self._finish(seq, RequestStatus.FINISHED_STOPPED)

    def drain_requests(self) -> list[Request]:
        """Take every unfinished request out, blocks freed, to be resumed elsewhere by add_resumed.

        Finished siblings stay finished; the others keep their output tokens and recompute.
        """
        for seq in self.running:
            self._free(seq, RequestStatus.PREEMPTED)
        self.running = []
        for seq in self.waiting.clear():
            self._free(seq, seq.status)  # forked siblings hold blocks while they wait
        drained = list(self.requests.values())
        self.requests, self.seqs, self._scheduled = {}, {}, {}
        return drained

    def return_released_blocks(self) -> None:
        """Give the blocks of finished and preempted sequences back to the free pool. The engine
        calls this while the device runs a step; an allocation that needs them does it itself."""
        self.block_manager.return_released()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_request(self, req_id: str) -> bool:
        return req_id in self.requests

    def num_cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """How many prompt tokens this replica's prefix cache would serve now (for placement)."""
        return self.block_manager.num_cached_tokens(prompt_token_ids)

    def get_stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(len(self.running), len(self.seqs) - len(self.running), bm.usage,
                              bm.prefix_cache_queries, bm.prefix_cache_hits, bm.prefix_cache_hit_rate,
                              self.num_preemptions)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData()
        num_scheduled: dict[str, int] = {}
        num_preemptions = self.num_preemptions

        # the per-sequence loop of every step (256 decodes: ~2 us a sequence on the CI machine),
        # so its lookups are bound once here
        running, block_size = self.running, self.block_size
        add_id, add_blocks, add_computed = (cached.req_ids.append, cached.new_block_ids.append,
                                            cached.num_computed_tokens.append)
        num_new_tokens, advance = self._num_new_tokens, self._advance
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_computed = seq.num_computed_tokens
            num_new = num_new_tokens(seq, num_computed, budget)
            if num_new == 0:
                i += 1
                continue
            new_block_ids = []
            if num_computed + num_new > len(seq.block_ids) * block_size:  # most decodes skip this
                if not self._make_room(seq, num_new):
                    break  # seq was the tail and preempted itself: nothing after it is left
                new_block_ids = self.block_manager.allocate(seq, num_computed + num_new)
            add_id(seq.seq_id)
            add_blocks(new_block_ids)
            add_computed(num_computed)
            num_scheduled[seq.seq_id] = num_new
            advance(seq, num_new)
            budget -= num_new
            i += 1

        # Admitting while preempting would only thrash: the blocks just freed are for the running.
        while (self.num_preemptions == num_preemptions and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting.peek()
            num_new = self._admit(seq, budget)
            if num_new == 0:
                break  # the head waits for budget or blocks; later ones do not overtake it
            self.waiting.pop()
            new_reqs.append(NewRequestData(
                seq.seq_id, seq.prompt_token_ids, list(seq.output_token_ids), seq.sampling_params,
                seq.index, list(seq.block_ids), seq.num_computed_tokens))
            num_scheduled[seq.seq_id] = num_new
            self._advance(seq, num_new)
            budget -= num_new

        decode_steps = 1
        if (self.config.num_scheduler_steps > 1 and not new_reqs and budget > 0
                and self.num_preemptions == num_preemptions and all(n == 1 for n in num_scheduled.values())
                and all(self.seqs[seq_id].output_token_ids for seq_id in num_scheduled)):
            # one pass where this step preempted (the blocks freed are for the running), or where a
            # sequence's first token is still in flight (the replica launches this step before it
            # returns that token, and k passes would delay it)
            budget, decode_steps = extend_decodes(cached, num_scheduled, budget, self.seqs, self.block_manager,
                                                  self.max_seq_len, self.config.num_scheduler_steps)

        finished, self.finished_seq_ids = self.finished_seq_ids, []
        self._step_id += 1
        if num_scheduled:
            self._scheduled[self._step_id] = {seq_id: self.seqs[seq_id] for seq_id in num_scheduled}
        return SchedulerOutput(self._step_id, new_reqs, cached, num_scheduled,
                               self.config.max_num_batched_tokens - budget, finished, decode_steps)

    # _advance and _num_new_tokens run for every scheduled sequence of every step: they read the
    # token lists' lengths directly rather than through Sequence's properties
    def _advance(self, seq: Sequence, num_new: int) -> None:
        seq.num_computed_tokens += num_new
        if seq.num_computed_tokens == len(seq.prompt_token_ids) + len(seq.output_token_ids) + seq.num_pending:
            seq.num_pending += 1  # caught up: this step samples its next token

    def _num_new_tokens(self, seq: Sequence, num_computed: int, budget: int) -> int:
        num_prompt, num_output = len(seq.prompt_token_ids), len(seq.output_token_ids) + seq.num_pending
        if seq.num_pending:
            max_tokens = seq.sampling_params.max_tokens
            if (max_tokens is not None and num_output >= max_tokens) or num_prompt + num_output >= self.max_seq_len:
                return 0  # its last token is in flight: scheduled ahead, it would compute past its end
        num_new = num_prompt + num_output - num_computed
        if num_new > budget and not self.config.enable_chunked_prefill:
            return 0  # without chunking a prefill runs whole or not at all
        return min(num_new, budget)

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Preempt from the running tail until seq's next tokens fit; False if seq itself went."""
        while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_new):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.pop()  # always the tail: the lowest priority / latest arrival
        self._free(seq, RequestStatus.PREEMPTED)
        self.waiting.push(seq)
        self.num_preemptions += 1

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence blocks and status RUNNING; return its tokens this step (0: not now)."""
        computed_blocks = None
        num_computed = seq.num_computed_tokens  # a forked sibling starts past the shared blocks
        if not seq.block_ids:
            computed_blocks = self.block_manager.get_computed_blocks(seq)
            num_computed = len(computed_blocks) * self.block_size
        num_new = self._num_new_tokens(seq, num_computed, budget)
        if num_new == 0 or not self.block_manager.can_allocate(seq, num_computed + num_new, computed_blocks or ()):
            return 0
        self.block_manager.allocate(seq, num_computed + num_new, computed_blocks)
        seq.num_computed_tokens = num_computed
        if seq.status is RequestStatus.WAITING:  # first admission: report its cache hit
            seq.num_cached_tokens = min(num_computed, seq.num_prompt_tokens)
        seq.status = RequestStatus.RUNNING
        bisect.insort(self.running, seq, key=self.policy_key)
        return num_new

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens, check stops, free finished sequences' blocks.

        Expects every scheduled sequence in model_runner_output.req_ids ([] for a partial prefill)
        so that the blocks it filled enter the prefix cache. Outputs of sequences finished,
        aborted or preempted since the step was scheduled are dropped.
        """
        outputs = []
        logprobs = model_runner_output.logprobs
        num_logprobs, sampled = len(logprobs), model_runner_output.sampled_token_ids
        num_scheduled, bs = scheduler_output.num_scheduled_tokens, self.block_size
        scheduled = self._scheduled.pop(scheduler_output.step_id, {})
        seqs, running, append_tokens = self.seqs, RequestStatus.RUNNING, self._append_tokens
        for i, seq_id in enumerate(model_runner_output.req_ids):
            seq = seqs.get(seq_id)
            if seq is None or seq is not scheduled.get(seq_id) or seq.status is not running:
                continue
            if seq.num_computed_tokens % bs < num_scheduled.get(seq_id, bs):  # the step filled a block
                self.block_manager.cache_blocks(seq)
            if seq.request.pending_siblings and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._start_siblings(seq)
            token_ids = sampled[i]
            if token_ids:
                outputs.append(append_tokens(seq, token_ids, logprobs[i] if i < num_logprobs else None))
        return outputs

    def _start_siblings(self, first: Sequence) -> None:
        # Share the full blocks before the one holding the last prompt token: each sibling
        # computes that token itself for its own logits, so it never writes a shared block.
        num_shared = (first.num_prompt_tokens - 1) // self.block_size
        request = first.request
        for seq in request.pending_siblings:
            self.block_manager.fork(first, seq, num_shared)
            seq.num_computed_tokens = seq.num_cached_tokens = num_shared * self.block_size
            # At the very front: they hold blocks and need only their tail, so they can always
            # start once the running sequences have made room (nothing waits on them forever).
            self.waiting.push(seq, front=True)
        request.pending_siblings = []

    def _append_tokens(self, seq: Sequence, token_ids: list[int],
                       logprobs: TokenLogprobs | None) -> EngineCoreOutput:
        seq.num_pending -= len(token_ids)
        if (len(token_ids) > 1 and logprobs is None
                and no_stop_among(seq, token_ids, self.eos_token_ids, self.max_seq_len)):
            seq.output_token_ids.extend(token_ids)  # a multi-step's tokens, none of which can stop it
            # still running: no finish or stop reason (what _output would read, built directly
            # since this runs for every sequence of every multi-step)
            return EngineCoreOutput(seq.req_id, seq.index, token_ids, None, None, None,
                                    len(seq.prompt_token_ids), seq.num_cached_tokens)
        for n, token_id in enumerate(token_ids, 1):
            seq.output_token_ids.append(token_id)
            status = check_stop(seq, token_id, self.eos_token_ids, self.max_seq_len)
            if status is not None:
                token_ids = token_ids[:n]  # nothing after a stop is emitted
                self._finish(seq, status)
                break
        return self._output(seq, token_ids, [logprobs] if logprobs is not None else None)

    def _output(self, seq: Sequence, new_token_ids: list[int],
                new_logprobs: list[TokenLogprobs] | None) -> EngineCoreOutput:
        return EngineCoreOutput(seq.req_id, seq.index, new_token_ids, new_logprobs,
                                seq.status.finish_reason, seq.stop_reason, len(seq.prompt_token_ids),
                                seq.num_cached_tokens)

    # ---- lifecycle --------------------------------------------------------------------------
    def _finish(self, seq: Sequence, status: RequestStatus) -> None:
        """Finish seq wherever it is; a waiting one must already be out of the waiting queue."""
        request = seq.request
        if seq.status is RequestStatus.RUNNING:
            self.running.remove(seq)
        elif seq in request.pending_siblings:
            request.pending_siblings.remove(seq)
        self._free(seq, status)
        if seq.index == 0 and request.pending_siblings:
            # the first sibling stopped before computing the prompt: the others start unforked
            for sibling in request.pending_siblings:
                self.waiting.push(sibling)
            request.pending_siblings = []
        del self.seqs[seq.seq_id]
        if request.is_finished:
            del self.requests[request.req_id]

    def _free(self, seq: Sequence, status: RequestStatus) -> None:
        if seq.status is RequestStatus.RUNNING:
            self.finished_seq_ids.append(seq.seq_id)  # the replica holds state for it
        if status is not seq.status:
            seq.status = status
        self.block_manager.release(seq)  # the pool gets them back at return_released_blocks
        seq.num_computed_tokens = 0
        seq.num_pending = 0  # samples still in flight for it are dropped by update_from_output
