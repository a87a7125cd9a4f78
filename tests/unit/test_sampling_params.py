import math

import pytest
from pydantic import ValidationError

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.errors import InvalidRequestError
from scheduler.sampling_params import SamplingParams

BAD_VALUES = [
    ("n", 0), ("n", 129), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", 100.5), ("temperature", math.nan), ("temperature", "1"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("min_p", -0.01), ("min_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", 10.5),
    ("presence_penalty", -2.1), ("presence_penalty", 2.1),
    ("frequency_penalty", -2.1), ("frequency_penalty", 2.1),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 1.5),
    ("stop", [""]), ("stop", [3]), ("stop", ["x"] * 33),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_out_of_range_rejected_naming_field(name, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{name: value})
    assert info.value.field == name
    assert str(info.value).startswith(f"{name}:")
    assert isinstance(info.value, ValueError)  # frontends may catch it as a plain ValueError


def test_every_field_has_a_rejection_case():
    checked = {name for name, _ in BAD_VALUES}
    assert checked == set(SamplingParams.__dataclass_fields__)


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(InvalidRequestError, match="min_tokens") as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.field == "min_tokens"
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000


def test_defaults_valid():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.max_tokens, p.min_tokens) == (1, 1.0, 0, 1.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.logprobs is None
    assert not p.is_greedy


@pytest.mark.parametrize("kwargs", [
    dict(n=128), dict(temperature=0), dict(temperature=100), dict(top_k=1), dict(top_p=1e-6),
    dict(min_p=1.0), dict(repetition_penalty=10), dict(presence_penalty=-2), dict(frequency_penalty=2),
    dict(seed=0), dict(seed=2**63 - 1), dict(max_tokens=None), dict(max_tokens=1, min_tokens=1),
    dict(stop=["a"] * 32), dict(stop_token_ids=[0]), dict(logprobs=0), dict(logprobs=20),
])
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(temperature=0.0).is_greedy


def test_check_vocab_names_stop_token_ids():
    p = SamplingParams(stop_token_ids=[5, 100])
    p.check_vocab(101)
    with pytest.raises(InvalidRequestError) as info:
        p.check_vocab(100)
    assert info.value.field == "stop_token_ids"


def test_clone_revalidates():
    p = SamplingParams(temperature=0.5, stop=["x"])
    q = p.clone(max_tokens=3)
    assert q.max_tokens == 3 and q.temperature == 0.5 and q.stop == ["x"] and p.max_tokens == 16
    with pytest.raises(InvalidRequestError, match="top_p"):
        p.clone(top_p=2.0)


# ---- configs: pydantic errors name the field ---------------------------------------------------
CONFIG_BAD_VALUES = [
    (CacheConfig, "block_size", 0), (CacheConfig, "block_size", 257),
    (CacheConfig, "gpu_memory_utilization", 0.0), (CacheConfig, "gpu_memory_utilization", 1.5),
    (CacheConfig, "num_gpu_blocks", 0), (CacheConfig, "enable_prefix_caching", "maybe"),
    (SchedulerConfig, "max_num_seqs", 0), (SchedulerConfig, "max_num_seqs", 4097),
    (SchedulerConfig, "max_num_batched_tokens", 0), (SchedulerConfig, "enable_chunked_prefill", "maybe"),
    (SchedulerConfig, "policy", "lifo"), (SchedulerConfig, "max_queued_requests", 0),
    (SchedulerConfig, "num_scheduler_steps", 0), (SchedulerConfig, "num_scheduler_steps", 65),
]


@pytest.mark.parametrize("cls,name,value", CONFIG_BAD_VALUES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CONFIG_BAD_VALUES])
def test_config_rejects_naming_field(cls, name, value):
    with pytest.raises(ValidationError) as info:
        cls(**{name: value})
    assert [e["loc"] for e in info.value.errors()] == [(name,)]
    assert name in str(info.value)


@pytest.mark.parametrize("cls", [CacheConfig, SchedulerConfig])
def test_config_every_field_has_a_rejection_case(cls):
    assert {n for c, n, _ in CONFIG_BAD_VALUES if c is cls} == set(cls.model_fields)


@pytest.mark.parametrize("cls", [CacheConfig, SchedulerConfig])
def test_config_forbids_unknown_fields(cls):
    with pytest.raises(ValidationError, match="blocksize"):
        cls(blocksize=16)


def test_config_validates_assignment_and_defaults():
    cache, sched = CacheConfig(), SchedulerConfig()
    assert (cache.block_size, cache.num_gpu_blocks, cache.enable_prefix_caching) == (16, None, True)
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.policy) == (256, 8192, "fcfs")
    with pytest.raises(ValidationError, match="max_num_seqs"):
        sched.max_num_seqs = 0
    with pytest.raises(ValidationError, match="block_size"):
        cache.block_size = -1
