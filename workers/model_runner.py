"""ModelRunner: one step = update the persistent batch, prepare inputs, forward, sample."""
import itertools
import logging
import time
from collections import deque

import numpy as np
import torch

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from workers.attention import get_attention_backend
from workers.attention.base import AttentionMetadata
from workers.config import ModelConfig
from workers.cuda_graphs import DecodeGraphs, PrefillGraphs
from scheduler.sampling_params import SamplingParams
from workers.input_batch import CachedRequestState, InputBatch, StepInputs
from workers.kv_cache import allocate_kv_caches
from workers.multi_step import MultiStepHandle, split_passes
from workers.parallel import TensorParallelGroup
from workers.pinned_staging import PinnedStaging, TokenBuffers, step_input_bytes
from workers.sampler import Sampler, SamplingTensors
from workers.weight_loader import checkpoint_dtype, load_model, resolve_dtype

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 hf_config, device: torch.device, parallel: TensorParallelGroup, eos_token_ids: list[int],
                 attention_backend: str = "auto", max_model_len: int = 0, enforce_eager: bool = True):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.hf_config = hf_config
        self.device = device
        self.parallel = parallel
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.dtype = resolve_dtype(model_config.dtype, device, checkpoint_dtype(hf_config))
        self.attn_backend = get_attention_backend(attention_backend, device)
        self.batch = InputBatch(cache_config.block_size)
        self.model = None
        self.kv_caches: list[torch.Tensor] = []
        self.sampler: Sampler | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.staging: PinnedStaging | None = None  # the step inputs' host memory, pinned on CUDA
        self.token_buffers = TokenBuffers(scheduler_config.max_num_seqs, pinned=device.type == "cuda")
        self._inflight: StepHandle | MultiStepHandle | None = None  # the last launched step, until collected
        self._uncollected: deque[StepHandle] = deque()  # launched passes not yet collected, oldest first

    def load_model(self) -> None:
        self.model = load_model(self.model_config, self.hf_config, self.device, self.dtype, self.parallel,
                                self.attn_backend)
        self.sampler = Sampler(self.hf_config.vocab_size, self.device, self.model_config.seed)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.hf_config, num_blocks, self.cache_config.block_size,
                                            self.dtype, self.device, self.parallel.tp_size)
        sched, block_size = self.scheduler_config, self.cache_config.block_size
        self.staging = PinnedStaging(step_input_bytes(sched.max_num_batched_tokens, sched.max_num_seqs,
                                                      -(-self.max_model_len // block_size)), self.device,
                                     num_arenas=min(2 * sched.num_scheduler_steps, 16))
        # graphs need kernels that read only device tensors and host ints fixed at capture
        if self.device.type == "cuda" and not self.enforce_eager and self.attn_backend.name == "triton":
            pool = torch.cuda.graph_pool_handle()  # one memory pool: only one graph runs at a time
            start = time.perf_counter()
            self.prefill_graphs = PrefillGraphs(self.model, self.kv_caches, sched.max_num_seqs,
                                                sched.max_num_batched_tokens, self.max_model_len, block_size,
                                                self.device, self.staging)
            self.prefill_graphs.capture(pool)
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, sched.max_num_seqs,
                                              self.max_model_len, block_size, self.device, self.staging)
            self.decode_graphs.capture(pool)
            logger.info("captured %d prefill graphs (%d..%d tokens) and %d decode graphs in %.1f s",
                        len(self.prefill_graphs.sizes), self.prefill_graphs.sizes[0],
                        self.prefill_graphs.sizes[-1], len(self.decode_graphs.sizes), time.perf_counter() - start)
        if self.device.type == "cuda":
            self._warm_logits(self.scheduler_config.max_num_seqs)

    @torch.inference_mode()
    def _warm_logits(self, max_rows: int) -> None:
        """Run the lm_head once at every row count a step can sample (1..max_num_seqs).

        The first lm_head call at a new row count blocked the host until the device had drained
        (cuBLAS's first call for a shape; no allocator retry, and CUDA_MODULE_LOADING=EAGER did not
        help): in the H100 throughput run, 35-75 ms inside each 16k-token prefill step's launch,
        and a stall at every new batch size in serving. Here it costs start-up one call a count."""
        hidden = torch.zeros(max_rows, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        for rows in range(1, max_rows + 1):
            self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, max_model_len: int, max_num_seqs: int) -> None:
        """The heaviest step the scheduler may send: num_tokens of prefill, then max_num_seqs logits
        rows through the sampler; run on a throwaway cache so peak activation memory shows."""
        bs = self.cache_config.block_size
        seq_lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
        num_blocks = sum(-(-n // bs) for n in seq_lens) + 1
        kv_caches = allocate_kv_caches(self.hf_config, num_blocks, bs, self.dtype, self.device, self.parallel.tp_size)
        starts = [0] + list(itertools.accumulate(seq_lens))
        block_tables = torch.zeros(len(seq_lens), -(-max(seq_lens) // bs), dtype=torch.int32)
        next_block = 1
        for i, n in enumerate(seq_lens):
            block_tables[i, :-(-n // bs)] = torch.arange(next_block, next_block - (-n // bs))
            next_block -= -n // bs
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        rows = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
        slots = block_tables[rows, positions // bs].long() * bs + positions % bs
        metadata = AttentionMetadata(slots.to(self.device), torch.tensor(starts, dtype=torch.int32, device=self.device),
                                     torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
                                     block_tables.to(self.device), starts, seq_lens, max(seq_lens), max(seq_lens))
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions.to(self.device), kv_caches, metadata)
        rows = torch.arange(max_num_seqs, device=self.device) % num_tokens
        # the sampler's worst case: every row random with top-k and top-p (a full sort)
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        states = [CachedRequestState(str(i), [0], [], params, 0, [], 0) for i in range(max_num_seqs)]
        self.sampler(self.model.compute_logits(hidden[rows]),
                     SamplingTensors.from_states(states, self.hf_config.vocab_size, self.device, self.eos_token_ids))
        del kv_caches, hidden

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(step).result()

    def launch(self, step: SchedulerOutput) -> "StepHandle | MultiStepHandle":
        """Enqueue a step on the device and return at once; result() waits for its tokens.
        A multi-step (decode_steps > 1) is its passes launched one after another."""
        if step.decode_steps == 1:
            return self._launch_pass(step)
        handles = [self._launch_pass(p) for p in split_passes(step)]
        self._inflight = MultiStepHandle(self, handles)
        return self._inflight

    @torch.inference_mode()
    def _launch_pass(self, step: SchedulerOutput) -> "StepHandle":
        """One forward pass.

        The next step may be launched before this one is collected: tokens it needs from this
        one are copied in on the device. A sequence whose sampling reads its own history
        (penalties, min_tokens, a seed's position) waits for the step in flight instead.
        """
        prev = self._inflight
        if prev is not None and any(_needs_history(self.batch.requests[r]) for r in step.num_scheduled_tokens
                                    if r in self.batch.requests):
            prev.result()
            prev = None
        self.batch.update(step)
        if step.total_num_scheduled_tokens == 0:
            return StepHandle.ready(ModelRunnerOutput([], [], []))
        inputs = self.batch.prepare(step)
        self.staging.begin_step()
        fill = None
        if inputs.pending_inputs:
            assert prev is not None and not prev.collected, "a pending input token with no step in flight"
            fill = prev.token_source([r for _, r in inputs.pending_inputs], [i for i, _ in inputs.pending_inputs],
                                     self._to_device)
        logits = self._forward(inputs, fill)
        self.staging.end_step()
        states = [self.batch.requests[r] for r in inputs.sampling_req_ids]
        token_ids, logprobs = self._sample(logits, states)
        handle = StepHandle(self, inputs, states, token_ids, logprobs)
        self._inflight = handle
        return handle

    def _to_device(self, a) -> torch.Tensor:
        return self.staging.to_device(a)

    def _forward(self, inputs: StepInputs, fill=None) -> torch.Tensor:
        """fill(input_ids on the device) copies in the input tokens still on the device."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(inputs):
            hidden = self.decode_graphs.run(inputs, fill)
            if len(inputs.logits_indices) < len(hidden):  # rows of a query, or a 1-token chunk that doesn't sample
                hidden = self._sampled_rows(hidden, inputs.logits_indices)
            return self.model.compute_logits(hidden)
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(inputs):
            hidden = self.prefill_graphs.run(inputs, fill)
            return self.model.compute_logits(self._sampled_rows(hidden, inputs.logits_indices))
        to_dev = self._to_device
        metadata = AttentionMetadata(
            slot_mapping=to_dev(inputs.slot_mapping),
            query_start_loc=to_dev(inputs.query_start_loc),
            seq_lens=to_dev(inputs.seq_lens),
            block_tables=to_dev(inputs.block_tables),
            query_start_loc_cpu=inputs.query_start_loc.tolist(),
            seq_lens_cpu=inputs.seq_lens.tolist(),
            max_query_len=int((inputs.query_start_loc[1:] - inputs.query_start_loc[:-1]).max()),
            max_seq_len=int(inputs.seq_lens.max()),
        )
        input_ids = to_dev(inputs.input_ids)
        if fill is not None:
            fill(input_ids)
        hidden = self.model(input_ids, to_dev(inputs.positions), self.kv_caches, metadata)
        return self.model.compute_logits(self._sampled_rows(hidden, inputs.logits_indices))

    def _sampled_rows(self, hidden: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """hidden's rows at indices, the last token of each sequence that samples, in step order
        (so increasing): a slice where they are consecutive (a prompt's or a prefix hit's last
        row, a decode batch), which spares the device an index copy and a gather before the
        lm_head; a gather otherwise (several queries, or a chunk that does not sample)."""
        n = len(indices)
        if n:
            first = int(indices[0])
            if int(indices[-1]) - first == n - 1:
                return hidden[first:first + n]
        return hidden[self._to_device(indices)]

    def _sample(self, logits: torch.Tensor, states) -> tuple[torch.Tensor, list]:
        """Token ids [N] still on the device, and logprobs lists (None where not asked)."""
        if not states:
            return torch.empty(0, dtype=torch.long, device=self.device), []
        tensors = SamplingTensors.from_states(states, self.sampler.vocab_size, self.device,
                                             self.eos_token_ids)
        out = self.sampler(logits, tensors)
        logprobs = out.logprobs if out.logprobs is not None else [None] * len(states)
        return out.token_ids, logprobs


def _needs_history(state: CachedRequestState) -> bool:
    """Sampling that reads the sequence's outputs, which a token in flight would leave short."""
    if not state.num_pending:
        return False
    p = state.sampling_params
    return (p.seed is not None or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0 or len(state.output_token_ids) + state.num_pending <= p.min_tokens)


class StepHandle:
    """A launched step: its sampled tokens on the device, copied to the host without blocking."""

    def __init__(self, runner: ModelRunner | None, inputs: StepInputs | None, states, token_ids, logprobs):
        self.runner, self.inputs, self.states = runner, inputs, states
        self.token_ids, self.logprobs = token_ids, logprobs  # [N] on the device
        self.row_of = {s.req_id: i for i, s in enumerate(states)}
        self._output: ModelRunnerOutput | None = None
        for state in states:
            state.num_pending += 1
        if runner is not None:
            runner._uncollected.append(self)
        self._host = token_ids
        self._buffer = None  # runner.token_buffers' buffer behind _host, given back once read
        self._event = None
        if token_ids is not None and token_ids.is_cuda:
            self._buffer = runner.token_buffers.take(len(token_ids))
            self._host = self._buffer[:len(token_ids)]
            self._host.copy_(token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def ready(cls, output: ModelRunnerOutput) -> "StepHandle":
        handle = cls(None, None, [], None, [])
        handle._output = output
        return handle

    @property
    def collected(self) -> bool:
        return self._output is not None

    def token_source(self, req_ids: list[str], positions: list[int], to_device):
        """fill(input_ids): input_ids[positions] = this step's tokens of req_ids, on the device.
        to_device(int64 array) copies the indices there (ModelRunner._to_device)."""
        rows = [self.row_of[r] for r in req_ids]
        n, row0, pos0 = len(rows), rows[0], positions[0]
        if rows == list(range(row0, row0 + n)) and positions == list(range(pos0, pos0 + n)):
            # a steady decode batch: its rows in the same order as the step before. One slice copy
            # instead of two index uploads, a gather and a scatter, ~18% of a batch-1 step's host
            # time on an H100 host (py-spy, s10-call7)
            return lambda input_ids: input_ids[pos0:pos0 + n].copy_(self.token_ids[row0:row0 + n])
        rows, index = (to_device(np.asarray(v, dtype=np.int64)) for v in (rows, positions))
        return lambda input_ids: input_ids.index_copy_(0, index, self.token_ids.index_select(0, rows))

    def result(self) -> ModelRunnerOutput:
        if self._output is not None:
            return self._output
        # tokens are appended in launch order: an older step still out goes first (a multi-step's
        # passes, when a later pass's sampling reads the history)
        while self.runner._uncollected[0] is not self:
            self.runner._uncollected[0].result()
        self.runner._uncollected.popleft()
        if self._event is not None:
            self._event.synchronize()
        sampled = self._host.tolist()
        if self._buffer is not None:
            self.runner.token_buffers.give_back(self._buffer)
            self._host = self._buffer = None
        for state, token in zip(self.states, sampled):
            state.output_token_ids.append(token)  # a state dropped meanwhile is simply left behind
            state.num_pending -= 1
        by_req = dict(zip(self.inputs.sampling_req_ids, zip(sampled, self.logprobs)))
        self._output = ModelRunnerOutput(
            self.inputs.req_ids, [[by_req[r][0]] if r in by_req else [] for r in self.inputs.req_ids],
            [by_req[r][1] if r in by_req else None for r in self.inputs.req_ids])
        if self.runner._inflight is self:
            self.runner._inflight = None
        self.runner = None
        return self._output
