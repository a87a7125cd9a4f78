"""Sampler: greedy, penalties, top-k/top-p/min-p, min_tokens, seeds, distribution, logprobs (CPU)."""
from dataclasses import dataclass, field

import pytest
import torch

from scheduler.sampling_params import SamplingParams
from workers.sampler import Sampler, SamplingTensors, row_seed

EOS = 7


@dataclass
class State:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    output_token_ids: list[int] = field(default_factory=list)
    sibling_index: int = 0


def sample(logits, states, seed=0, sampler=None):
    V = logits.shape[-1]
    sampler = sampler or Sampler(V, "cpu", seed)
    tensors = SamplingTensors.from_states(states, V, "cpu", eos_token_ids=[EOS])
    return sampler(logits, tensors)


def tokens(logits, states, **kwargs):
    return sample(logits, states, **kwargs).token_ids.tolist()


def rows(params, n, **state_kwargs):
    return [State(params, **state_kwargs) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    states = rows(SamplingParams(temperature=0.0), 4) + [State(SamplingParams(temperature=1e-7))]
    out = sample(logits, states)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.token_ids.dtype == torch.int64 and out.logprobs is None


def test_bf16_logits_sample_as_their_float32_widening():
    """The model hands over bf16 logits: greedy argmaxes them as they are (ties: the first index),
    everything else widens them first; either way the tokens are those of the float32 logits."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)).bfloat16()
    logits[0, 10] = logits[0, 200] = logits[0].max() + 1  # a tie: the lower index wins in both dtypes
    greedy = rows(SamplingParams(temperature=0.0), 6)
    assert tokens(logits, greedy) == tokens(logits.float(), greedy) == logits.float().argmax(-1).tolist()
    assert tokens(logits, greedy)[0] == 10
    # min_tokens, penalties and random rows take the float32 path: same tokens from either input
    mixed = [State(SamplingParams(temperature=0.0, min_tokens=2)), State(SamplingParams(temperature=0.0,
             repetition_penalty=1.5)), State(SamplingParams(temperature=0.8, top_k=20, seed=3))] * 2
    assert tokens(logits, mixed) == tokens(logits.float(), mixed)
    out = sample(logits, rows(SamplingParams(temperature=0.0, logprobs=2), 6))
    assert out.token_ids[0] == 10 and out.logprobs[0].logprob == out.logprobs[0].top_logprobs[0]


def test_flags_skip_unused_work():
    t = SamplingTensors.from_states(rows(SamplingParams(temperature=0.0), 3), 50, "cpu")
    assert t.all_greedy and not t.all_random
    assert t.output_token_ids is None and t.prompt_token_ids is None and t.min_tokens_mask is None
    assert t.argmax_only and t.temperature is None and t.top_k is None  # nothing copied to the device
    # any row that needs more than the argmax brings every row's controls back
    for needs_more in (SamplingParams(temperature=0.0, logprobs=1),
                       SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]),
                       SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams()):
        t = SamplingTensors.from_states(rows(SamplingParams(temperature=0.0), 2) + rows(needs_more, 1), 50, "cpu")
        assert not t.argmax_only and t.temperature is not None
        assert t.is_greedy.tolist() == [True, True, needs_more.is_greedy]
    t = SamplingTensors.from_states(rows(SamplingParams(), 3), 50, "cpu")
    assert t.all_random and not (t.needs_top_k or t.needs_top_p or t.needs_min_p)
    assert t.max_num_logprobs == -1 and t.seeded_rows == []


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0, 3.0],
                           [2.0, -2.0, 1.0, 0.5, -1.0, 3.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    states = [State(params, prompt_token_ids=[0, 1], output_token_ids=[2, 2, 3]),
              State(SamplingParams(temperature=0.0), prompt_token_ids=[0, 1], output_token_ids=[2, 2, 3])]
    t = SamplingTensors.from_states(states, 6, "cpu")
    got = Sampler(6, "cpu", 0)._apply_penalties(logits, t)
    # repetition over prompt+output (divide positive, multiply negative); presence/frequency over
    # output only: token 2 (twice) -0.5 -0.5, token 3 (once) -0.25 -0.5; prompt-only tokens 0, 1 only rp
    expected = torch.tensor([1.0, -4.0, 0.5 - 0.5 - 0.5, 0.25 - 0.25 - 0.5, -1.0, 3.0])
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], logits[1])  # a row without penalties is untouched


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    assert tokens(logits, [State(SamplingParams(temperature=0.0), output_token_ids=[0])]) == [0]
    for params in (SamplingParams(temperature=0.0, repetition_penalty=1.5),
                   SamplingParams(temperature=0.0, presence_penalty=1.5),
                   SamplingParams(temperature=0.0, frequency_penalty=0.6)):
        assert tokens(logits, [State(params, prompt_token_ids=[2], output_token_ids=[0, 0])]) == [1]
    # presence/frequency ignore the prompt; repetition does not
    prompt_only = dict(prompt_token_ids=[0], output_token_ids=[])
    assert tokens(logits, [State(SamplingParams(temperature=0.0, presence_penalty=2.0), **prompt_only)]) == [0]
    assert tokens(logits, [State(SamplingParams(temperature=0.0, repetition_penalty=1.5), **prompt_only)]) == [1]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = torch.randn(64, 200, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1).tolist()
    assert tokens(logits, rows(SamplingParams(temperature=1.5, top_k=1), 64)) == greedy
    assert tokens(logits, rows(SamplingParams(temperature=1.5, top_p=1e-6), 64)) == greedy
    assert tokens(logits, rows(SamplingParams(temperature=1.5, top_k=5, top_p=1e-6), 64)) == greedy


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    states = [State(SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=3 if i % 4 == 0 else 0))
              for i in range(8)]
    got = tokens(logits, states)
    assert got[1::2] == logits.argmax(-1).tolist()[1::2]
    top3 = logits[0::4].topk(3, dim=-1).indices
    assert all(tok in top3[j].tolist() for j, tok in enumerate(got[0::4]))


def test_min_p_keeps_only_likely_tokens():
    probs = torch.tensor([0.4, 0.25, 0.19, 0.1, 0.06])
    logits = probs.log().expand(4000, -1).contiguous()
    got = set(tokens(logits, rows(SamplingParams(min_p=0.5), 4000)))
    assert got == {0, 1}  # 0.19 < 0.5 * 0.4
    got = set(tokens(logits, rows(SamplingParams(min_p=0.2), 4000)))
    assert got == {0, 1, 2, 3}


def test_top_k_and_top_p_sets():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(4000, -1).contiguous()
    assert set(tokens(logits, rows(SamplingParams(top_k=2), 4000))) == {0, 1}
    assert set(tokens(logits, rows(SamplingParams(top_p=0.85), 4000))) == {0, 1, 2}
    assert set(tokens(logits, rows(SamplingParams(top_p=0.8), 4000))) == {0, 1}


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 5] = 8.0
    greedy = SamplingParams(temperature=0.0, min_tokens=2)
    assert tokens(logits, [State(greedy, output_token_ids=[1])]) == [3]  # 1 output < 2
    assert tokens(logits, [State(greedy, output_token_ids=[1, 1])]) == [EOS]  # min reached
    with_stop = greedy.clone(stop_token_ids=[3])
    assert tokens(logits, [State(with_stop, output_token_ids=[])]) == [5]
    # ignore_eos: EOS is not a stop token, so only stop_token_ids are masked
    assert tokens(logits, [State(with_stop.clone(ignore_eos=True))]) == [EOS]
    random_row = SamplingParams(min_tokens=1)
    assert EOS not in tokens(logits.expand(500, -1).contiguous(), rows(random_row, 500))


def test_seeded_row_ignores_batch_composition_and_position():
    gen = torch.Generator().manual_seed(3)
    row_logits = torch.randn(1, 500, generator=gen)
    others = torch.randn(5, 500, generator=gen)
    seeded = State(SamplingParams(seed=1234, temperature=0.9, top_p=0.95), output_token_ids=[4, 4, 4])
    alone = tokens(row_logits, [seeded])
    for position in range(6):
        batch = [State(SamplingParams()), State(SamplingParams(seed=99)), State(SamplingParams(temperature=0.0)),
                 State(SamplingParams(top_k=10)), State(SamplingParams(seed=5, min_p=0.1))]
        batch.insert(position % 6, seeded)
        logits = torch.cat([others[:position % 6], row_logits, others[position % 6:]])
        # a fresh sampler with another global seed, as after a restart
        assert tokens(logits, batch, seed=position)[position % 6] == alone[0]
    sampler = Sampler(500, "cpu", 0)  # repeated calls on one sampler: global stream advances, row does not
    assert [tokens(row_logits, [seeded], sampler=sampler)[0] for _ in range(3)] == alone * 3


def test_seeded_noise_is_a_function_of_seed_sibling_position():
    logits = torch.zeros(1, 1000)  # uniform: the noise alone picks the token

    def draw(seed, sibling=0, position=0):
        state = State(SamplingParams(seed=seed), output_token_ids=[0] * position, sibling_index=sibling)
        return tokens(logits, [state])[0]

    assert draw(1, 0, 5) == draw(1, 0, 5)
    assert len({draw(seed) for seed in range(20)}) > 15  # different seeds differ
    assert len({draw(1, sibling) for sibling in range(20)}) > 15  # n > 1 siblings differ
    assert len({draw(1, 0, position) for position in range(20)}) > 15  # successive tokens differ
    assert row_seed(1, 2, 3) != row_seed(1, 3, 2)


def chi_square(samples, probs):
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_distribution(seeded):
    # 8 tokens, 7 degrees of freedom: P(chi2 > 40) is about 1e-6, and the seeds are fixed
    n = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    batch = logits.expand(n, -1).contiguous()
    states = [State(SamplingParams(temperature=0.7, seed=i if seeded else None)) for i in range(n)]
    assert chi_square(tokens(batch, states), (logits / 0.7).softmax(-1)) < 40
    top_k = [State(SamplingParams(top_k=3, seed=i if seeded else None)) for i in range(n)]
    restricted = logits[:3].softmax(-1)
    assert chi_square(tokens(batch, top_k), torch.cat([restricted, torch.zeros(5)]).clamp_min(1e-12)) < 40


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(4))
    states = [State(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=3.0)),
              State(SamplingParams()),
              State(SamplingParams(temperature=0.5, logprobs=0, seed=1)),
              State(SamplingParams(top_k=20, logprobs=20))]
    before = logits.clone()
    out = sample(logits, states)
    assert torch.equal(logits, before)  # the sampler leaves its input alone
    ref = logits.log_softmax(-1)
    ids = out.token_ids.tolist()
    assert out.logprobs[1] is None
    for row, n in ((0, 5), (2, 0), (3, 20)):
        lp = out.logprobs[row]
        assert lp.logprob == pytest.approx(ref[row, ids[row]].item(), abs=1e-5)
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == n
        values, indices = ref[row].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert lp.top_token_ids == indices.tolist()
        assert lp.top_logprobs == pytest.approx(values.tolist(), abs=1e-5)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert all(isinstance(x, int) for x in lp.top_token_ids)


def test_logprobs_all_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    out = sample(logits, rows(SamplingParams(temperature=0.0, logprobs=2), 3))
    for row in range(3):
        assert out.logprobs[row].top_token_ids[0] == out.token_ids[row].item()
        assert out.logprobs[row].logprob == pytest.approx(logits[row].log_softmax(-1).max().item(), abs=1e-5)


def test_top_p_within_top_k_matches_full_sort():
    from workers.sampler import _apply_top_k_top_p

    logits = torch.randn(6, 400, generator=torch.Generator().manual_seed(6))
    top_k = torch.tensor([1, 5, 20, 20, 7, 13])
    top_p = torch.tensor([0.5, 0.9, 0.3, 1.0, 0.99, 0.7])
    full = _apply_top_k_top_p(logits, top_k, top_p, None)
    assert torch.equal(_apply_top_k_top_p(logits, top_k, top_p, 20), full)
    assert torch.equal(_apply_top_k_top_p(logits, top_k, top_p, 64), full)
    # a batch mixing top-k rows with top-p-only rows takes the full sort, same answer per row
    states = [State(SamplingParams(top_k=5, top_p=0.9, seed=1)), State(SamplingParams(top_p=0.5, seed=2))]
    assert tokens(logits[:2], states)[0] == tokens(logits[:1], states[:1])[0]
