"""Sampling on the device, batched over the N sequences that sample this step.

gpt-fast style: every op is batched over rows and nothing waits on the GPU. Random rows sample
by the exponential race (argmax of probs / Exponential(1) noise, which picks token i with
probability probs[i]) instead of torch.multinomial, which syncs. Work no row needs is skipped
on host-side flags, so an all-greedy batch with no penalties is one argmax.

Order, as HF generate: min_tokens mask, penalties, then greedy argmax or
temperature -> top-k -> top-p -> softmax -> min-p -> exponential race.

Logprobs are those of the model's raw distribution, log_softmax(logits) before min_tokens,
penalties and temperature (vLLM's default): they say what the model thought, not how it was
sampled, and so they are comparable across requests with different sampling settings.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from scheduler.output import TokenLogprobs
from scheduler.sampling_params import SamplingParams

# temperatures below this are greedy (as vLLM): the softmax would be one-hot anyway, and
# treating them as greedy keeps them deterministic
SAMPLING_EPS = 1e-5
_MASK64 = (1 << 64) - 1


class SamplingState(Protocol):
    """What from_states reads from each sequence (workers.input_batch.CachedRequestState)."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    sampling_params: SamplingParams
    sibling_index: int


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a bijection on 64 bits that spreads every input bit over the output
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, sibling_index: int, position: int) -> int:
    """Generator seed for one sampled token of a seeded request: a pure function of its inputs,
    so batch composition, batch position, preemption and restarts never change the noise."""
    return _mix64(_mix64(_mix64(seed) ^ sibling_index) ^ position)


@dataclass
class SamplingTensors:
    """Per-row sampling controls of one step, on the device, plus host flags to skip work.

    When argmax_only (every row greedy, no min_tokens, penalties or logprobs: the common batch of
    a benchmark or an eval) the per-row tensors below are None: the step needs only the argmax,
    so it copies nothing to the device for them.
    """

    temperature: torch.Tensor | None  # [N] float32; 1.0 on greedy rows so the division is a no-op
    top_k: torch.Tensor | None  # [N] int64 in [1, V]; V where off
    top_p: torch.Tensor | None  # [N] float32; 1.0 where off
    min_p: torch.Tensor | None  # [N] float32; 0.0 where off
    repetition_penalty: torch.Tensor | None  # [N] float32
    presence_penalty: torch.Tensor | None  # [N] float32
    frequency_penalty: torch.Tensor | None  # [N] float32
    is_greedy: torch.Tensor | None  # [N] bool
    # token histories padded with vocab_size (a spare count column), only for rows with penalties
    prompt_token_ids: torch.Tensor | None  # [N, Lp] int64; None unless a row has repetition_penalty
    output_token_ids: torch.Tensor | None  # [N, Lo] int64; None unless a row has a penalty
    min_tokens_mask: torch.Tensor | None  # [K] int64 flat indices row * V + token id, forced to -inf
    seeded_rows: list[tuple[int, int]]  # (row, row_seed) for random rows with a seed
    num_logprobs: list[int | None]  # [N] SamplingParams.logprobs
    logprob_rows: list[int]  # rows with num_logprobs set
    logprob_rows_t: torch.Tensor | None  # [R] int64 on device; None when every row asks
    argmax_only: bool
    all_greedy: bool
    all_random: bool
    needs_top_k: bool
    max_top_k: int  # largest top_k among random rows that use it
    all_top_k: bool  # every random row uses top-k, so top-p can sort only max_top_k values
    needs_top_p: bool
    needs_min_p: bool
    max_num_logprobs: int  # -1 when no row asks

    @classmethod
    def from_states(cls, states: Sequence[SamplingState], vocab_size: int, device: torch.device | str,
                    eos_token_ids: Sequence[int] = ()) -> "SamplingTensors":
        """Build from the N sampling sequences of a step, in batch order. eos_token_ids are
        masked with stop_token_ids while a row has fewer than min_tokens outputs (not under
        ignore_eos)."""
        device = torch.device(device)
        pin = device.type == "cuda"  # pinned host memory makes the non_blocking copies truly async
        V = vocab_size
        n = len(states)
        # rows gathered as tuples and converted in one call each: assigning a column per row cost
        # ~1 us a row
        float_rows, int_rows = [], []  # (temperature, top_p, min_p, rep, presence, freq), (top_k, is_greedy)
        seeded_rows, mask_flat, rep_rows, pen_rows = [], [], [], []
        num_logprobs, max_top_k = [], 0
        for i, s in enumerate(states):
            p = s.sampling_params
            greedy = p.temperature < SAMPLING_EPS
            top_k = min(p.top_k, V) if p.top_k > 0 else V
            if not greedy and top_k < V:
                max_top_k = max(max_top_k, top_k)
            float_rows.append((1.0 if greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                               p.presence_penalty, p.frequency_penalty))
            int_rows.append((top_k, greedy))
            if p.seed is not None and not greedy:
                seeded_rows.append((i, row_seed(p.seed, s.sibling_index, len(s.output_token_ids))))
            if len(s.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) if p.ignore_eos else {*p.stop_token_ids, *eos_token_ids}
                mask_flat += [i * V + t for t in sorted(stop_ids) if 0 <= t < V]
            if p.repetition_penalty != 1.0:
                rep_rows.append(i)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                pen_rows.append(i)
            num_logprobs.append(p.logprobs)

        def to_device(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a)
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        def padded(rows: list[int], seqs: list[Sequence[int]]) -> torch.Tensor:
            # only rows that use the history are filled; the others' penalties are no-ops anyway
            width = max([len(seqs[r]) for r in rows] + [1])
            a = np.full((n, width), V, dtype=np.int64)
            for r in rows:
                a[r, :len(seqs[r])] = seqs[r]
            return to_device(a)

        random_rows = [i for i, (_, greedy) in enumerate(int_rows) if not greedy]
        logprob_rows = [i for i, x in enumerate(num_logprobs) if x is not None]
        argmax_only = not random_rows and not mask_flat and not pen_rows and not logprob_rows
        f, k = [None] * 6, [None] * 2
        if not argmax_only:
            floats = np.array(float_rows, dtype=np.float32).reshape(n, 6).T.copy()  # [6, N]
            f = to_device(floats)
            k = to_device(np.array(int_rows, dtype=np.int64).reshape(n, 2).T.copy())  # [2, N]
        return cls(
            temperature=f[0], top_p=f[1], min_p=f[2],
            repetition_penalty=f[3], presence_penalty=f[4], frequency_penalty=f[5],
            top_k=k[0], is_greedy=None if argmax_only else k[1].bool(),
            prompt_token_ids=padded(rep_rows, [s.prompt_token_ids for s in states]) if rep_rows else None,
            output_token_ids=padded(pen_rows, [s.output_token_ids for s in states]) if pen_rows else None,
            min_tokens_mask=to_device(np.array(mask_flat, dtype=np.int64)) if mask_flat else None,
            seeded_rows=seeded_rows,
            num_logprobs=num_logprobs,
            logprob_rows=logprob_rows,
            logprob_rows_t=(None if len(logprob_rows) in (0, n)
                            else to_device(np.array(logprob_rows, dtype=np.int64))),
            argmax_only=argmax_only,
            all_greedy=not random_rows,
            all_random=len(random_rows) == n,
            needs_top_k=max_top_k > 0,
            max_top_k=max_top_k,
            all_top_k=bool(random_rows) and all(int_rows[i][0] < V for i in random_rows),
            # compared in float32, as the device sees them; random rows mean floats was built
            needs_top_p=bool(random_rows) and any(floats[1, i] < 1.0 for i in random_rows),
            needs_min_p=bool(random_rows) and any(floats[2, i] > 0.0 for i in random_rows),
            max_num_logprobs=max([num_logprobs[i] for i in logprob_rows], default=-1),
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64 on the device; the caller does the one .tolist()
    logprobs: list[TokenLogprobs | None] | None  # [N]; None when no row asked


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str, seed: int):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # unseeded rows share one stream, seeded once at start-up (ModelConfig.seed)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # reseeded per seeded row per step; manual_seed resets all of its state
        self.row_generator = torch.Generator(self.device)

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """logits: [N, V] in the model's dtype, left unchanged."""
        if t.argmax_only:
            # float32 widening is exact and argmax takes the first of equal maxima in either dtype,
            # so this is the float32 argmax, without the copy
            return SamplerOutput(logits.argmax(dim=-1), None)
        logits = logits.float()
        # raw model distribution, taken before anything below rewrites the logits
        raw_logprobs = self._raw_logprobs(logits, t) if t.logprob_rows else None
        logits = self._apply_min_tokens(logits, t)
        logits = self._apply_penalties(logits, t)
        greedy = None if t.all_random else logits.argmax(dim=-1)  # [N]
        if t.all_greedy:
            token_ids = greedy
        else:
            sampled = self._sample(logits, t)
            token_ids = sampled if greedy is None else torch.where(t.is_greedy, greedy, sampled)
        logprobs = None if raw_logprobs is None else self._logprobs_lists(raw_logprobs, token_ids, t)
        return SamplerOutput(token_ids, logprobs)

    def _apply_min_tokens(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        if t.min_tokens_mask is None:
            return logits
        # flat index_fill_: advanced-index assignment (logits[rows, ids] = x) syncs on CUDA
        logits = logits.clone(memory_format=torch.contiguous_format)
        logits.view(-1).index_fill_(0, t.min_tokens_mask, float("-inf"))
        return logits

    def _apply_penalties(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        if t.output_token_ids is None:
            return logits
        n, V = logits.shape
        out_ids = t.output_token_ids  # [N, Lo], padding lands in the spare column V
        counts = torch.zeros(n, V + 1, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, dtype=logits.dtype, device=logits.device))
        counts = counts[:, :V]  # [N, V] times each token was generated
        if t.prompt_token_ids is not None:
            # HF/vLLM repetition penalty over prompt and output: shrink toward zero whichever the sign
            seen = torch.zeros(n, V + 1, dtype=torch.bool, device=logits.device)
            seen = seen.scatter_(1, t.prompt_token_ids, True)[:, :V] | (counts > 0)
            rp = t.repetition_penalty[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        # OpenAI/vLLM presence and frequency penalties count output tokens only
        return (logits - t.frequency_penalty[:, None] * counts
                - t.presence_penalty[:, None] * (counts > 0).to(logits.dtype))

    def _sample(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        logits = logits / t.temperature[:, None]
        if t.needs_top_p:
            logits = _apply_top_k_top_p(logits, t.top_k if t.needs_top_k else None, t.top_p,
                                        t.max_top_k if t.all_top_k else None)
        elif t.needs_top_k:
            logits = _apply_top_k(logits, t.top_k, t.max_top_k)
        probs = logits.softmax(dim=-1)
        if t.needs_min_p:
            # the race needs no renormalisation: argmax(probs / q) ignores a per-row scale
            threshold = probs.amax(dim=-1, keepdim=True) * t.min_p[:, None]
            probs = probs.masked_fill_(probs < threshold, 0.0)
        # a masked token's 0 / q is never NaN: CUDA's exponential_ is clamped away from 0, and on
        # the CPU it draws in double, where a 0 has probability about 2**-53
        return probs.div_(self._exponential_noise(probs, t.seeded_rows)).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, seeded_rows: list[tuple[int, int]]) -> torch.Tensor:
        q = torch.empty_like(probs)  # [N, V]
        if len(seeded_rows) < q.shape[0]:
            q.exponential_(generator=self.generator)
        # one launch per seeded row: its noise depends only on (seed, sibling, position)
        for row, seed in seeded_rows:
            self.row_generator.manual_seed(seed)
            q[row].exponential_(generator=self.row_generator)
        return q

    def _raw_logprobs(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        rows = logits if t.logprob_rows_t is None else logits.index_select(0, t.logprob_rows_t)
        return rows.float().log_softmax(dim=-1)  # [R, V]

    def _logprobs_lists(self, logprobs: torch.Tensor, token_ids: torch.Tensor,
                        t: SamplingTensors) -> list[TokenLogprobs | None]:
        # the one place the sampler syncs, and only when a row asked for logprobs
        sampled = token_ids if t.logprob_rows_t is None else token_ids.index_select(0, t.logprob_rows_t)
        chosen = logprobs.gather(1, sampled[:, None]).squeeze(1).tolist()  # [R]
        top_lps, top_ids = [[]] * len(chosen), [[]] * len(chosen)
        if t.max_num_logprobs > 0:
            values, indices = logprobs.topk(t.max_num_logprobs, dim=-1)  # [R, max_n], descending
            top_lps, top_ids = values.tolist(), indices.tolist()
        out: list[TokenLogprobs | None] = [None] * len(t.num_logprobs)
        for j, row in enumerate(t.logprob_rows):
            k = t.num_logprobs[row]
            out[row] = TokenLogprobs(chosen[j], top_ids[j][:k], top_lps[j][:k])
        return out


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # top-k alone needs each row's k-th largest value, and the max_top_k largest hold it: no full sort
    top = logits.topk(max_top_k, dim=-1).values  # [N, max_top_k], descending
    kth = top.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])  # [N, 1]
    kth = kth.masked_fill_((top_k >= logits.shape[-1])[:, None], float("-inf"))  # rows with top-k off
    return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th survive, as in HF


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor,
                       max_top_k: int | None) -> torch.Tensor:
    """max_top_k: every random row has a top-k of at most this, so only the max_top_k largest
    logits can survive, and a top-k of them replaces the full sort of V (about half the sampling
    time on an H200 at N=256, V=152k, top_k=50, top_p=0.9)."""
    if max_top_k is None:
        values, indices = logits.sort(dim=-1)  # [N, K = V], ascending
        out = torch.empty_like(logits)
    else:
        values, indices = logits.topk(max_top_k, dim=-1)  # [N, K], descending
        values, indices = values.flip(-1), indices.flip(-1)
        out = torch.full_like(logits, float("-inf"))
    K = values.shape[-1]
    if top_k is not None:
        # K - k picks the k-th largest; k = V (off) picks the smallest. Greedy rows may have
        # k > K: the clamp keeps the gather in range and their samples are discarded anyway
        kth = values.gather(1, (K - top_k.clamp(max=K))[:, None])
        values = values.masked_fill(values < kth, float("-inf"))  # ties with the k-th survive, as HF
    # ascending, as vLLM: top_p = 1 then drops only tokens of probability exactly 0
    cum_probs = values.softmax(dim=-1).cumsum(dim=-1)
    drop = cum_probs <= (1.0 - top_p)[:, None]  # the tail whose whole mass is under 1 - p
    drop[:, -1] = False  # the most likely token always survives
    return out.scatter_(1, indices, values.masked_fill_(drop, float("-inf")))
