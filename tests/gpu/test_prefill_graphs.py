"""PrefillGraphs (workers/cuda_graphs.py) against the eager model on the same steps: the hidden states
and the whole KV cache must come out the same, so the padding (empty sequences, slot -1 tokens,
stale buffers from a larger step before) is inert.

On CUDA the graphs are captured for real. Under Triton's CPU interpreter (TRITON_INTERPRET=1) each
"graph" re-runs the model on the static buffers at replay, which still checks the padding through
the real kernels.
"""
import numpy as np
import pytest
import torch

from tests.gpu.triton_device import triton_device

DEVICE = triton_device()

pytest.importorskip("triton")
from workers.attention.base import AttentionMetadata  # noqa: E402
from workers.attention.triton_backend import TritonBackend  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.cuda_graphs import PrefillGraphs  # noqa: E402
from workers.input_batch import StepInputs  # noqa: E402
from workers.kv_cache import allocate_kv_caches  # noqa: E402
from workers.model_configs import resolve_model  # noqa: E402
from workers.pinned_staging import PinnedStaging, step_input_bytes  # noqa: E402
from workers.weight_loader import load_model  # noqa: E402

pytestmark = [pytest.mark.gpu]

BLOCK_SIZE = 16
NUM_BLOCKS = 96
MAX_MODEL_LEN = 512


class _EagerReplay:
    """Stands in for a captured graph under the interpreter: replay runs the model on the buffers."""

    def __init__(self, graphs: PrefillGraphs, num_tokens: int):
        self.graphs, self.num_tokens = graphs, num_tokens

    def replay(self) -> None:
        self.graphs.forward(self.num_tokens)


@pytest.fixture(scope="module")
def model_and_config(tiny_model_dir):
    hf_config, _ = resolve_model(str(tiny_model_dir))
    model_config = ModelConfig(model=str(tiny_model_dir), dtype="float32")
    model = load_model(model_config, hf_config, DEVICE, torch.float32, attn_backend=TritonBackend(DEVICE))
    return model, hf_config


def _step(rng: np.random.Generator, context_lens: list[int], query_lens: list[int]) -> StepInputs:
    """Sequences with context_lens[i] tokens already cached and query_lens[i] new ones, each on its
    own random blocks."""
    free = list(rng.permutation(NUM_BLOCKS - 1) + 1)
    tables, positions, slots = [], [], []
    for ctx, q in zip(context_lens, query_lens):
        blocks = [free.pop() for _ in range(-(-(ctx + q) // BLOCK_SIZE))]
        tables.append(blocks)
        pos = np.arange(ctx, ctx + q)
        positions.append(pos)
        slots.append(np.asarray(blocks)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
    width = max(len(t) for t in tables)
    block_tables = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = t
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1])
    req_ids = [str(i) for i in range(len(query_lens))]
    return StepInputs(req_ids, rng.integers(0, 151643, num_tokens).astype(np.int64),
                      np.concatenate(positions).astype(np.int64), np.concatenate(slots).astype(np.int64),
                      query_start_loc, (np.asarray(context_lens) + np.asarray(query_lens)).astype(np.int32),
                      block_tables, (query_start_loc[1:] - 1).astype(np.int64), req_ids, [])


def _staging(max_tokens: int, max_seqs: int) -> PinnedStaging:
    return PinnedStaging(step_input_bytes(max_tokens, max_seqs, MAX_MODEL_LEN // BLOCK_SIZE), torch.device(DEVICE))


def _eager(model, step: StepInputs, kv_caches) -> torch.Tensor:
    def dev(a):
        return torch.from_numpy(a).to(DEVICE)

    metadata = AttentionMetadata(dev(step.slot_mapping), dev(step.query_start_loc), dev(step.seq_lens),
                                 dev(step.block_tables), step.query_start_loc.tolist(), step.seq_lens.tolist(),
                                 int(np.diff(step.query_start_loc).max()), int(step.seq_lens.max()))
    return model(dev(step.input_ids), dev(step.positions), kv_caches, metadata)


@torch.inference_mode()
def test_prefill_graphs_match_eager_steps(model_and_config):
    model, hf_config = model_and_config
    torch.manual_seed(0)
    kv_eager = allocate_kv_caches(hf_config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device(DEVICE))
    for cache in kv_eager:  # cached context to attend over
        cache.normal_()
    kv_graph = [c.clone() for c in kv_eager]
    graphs = PrefillGraphs(model, kv_graph, max_num_seqs=32, max_num_batched_tokens=256,
                           max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, device=torch.device(DEVICE),
                           staging=_staging(256, 32))
    assert graphs.sizes == [4, 8, 16, 32, 64, 128, 256] and graphs.max_seqs == 32
    if DEVICE == "cuda":
        graphs.capture()
    else:
        graphs.graphs = {t: _EagerReplay(graphs, t) for t in graphs.sizes}
    rng = np.random.default_rng(0)
    steps = [
        ([0, 40, 17, 90, 3], [200, 1, 1, 30, 9]),  # a large step first: its buffers go stale below
        ([0], [5]),  # one short prompt
        ([2048 // 8], [4]),  # a prefix-cache hit: few new tokens over a long cached context
        ([20, 33, 47, 16, 0], [1, 1, 1, 40, 7]),  # decodes mixed with a chunk and a fresh prompt
        ([i * 5 for i in range(16)], [4] * 16),  # 64 tokens exactly
        ([i for i in range(32)], [1] * 31 + [90]),  # the most sequences a graph takes: 32 (max_num_seqs)
    ]
    for ctx, q in steps:
        step = _step(rng, ctx, q)
        assert graphs.can_run(step)
        before = graphs.replays
        graphs.staging.begin_step()
        hidden = graphs.run(step).clone()
        graphs.staging.end_step()
        assert graphs.replays == before + 1
        expected = _eager(model, step, kv_eager)
        torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)
        for got, want in zip(kv_graph, kv_eager):  # padding wrote nowhere; real tokens where eager did
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prefill_graphs_refuse_what_they_cannot_hold(model_and_config):
    model, hf_config = model_and_config
    graphs = PrefillGraphs(model, [], max_num_seqs=32, max_num_batched_tokens=100,
                           max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, device=torch.device(DEVICE),
                           staging=_staging(100, 32))
    assert graphs.sizes == [4, 8, 16, 32, 64, 100], "the step budget itself is the largest graph"
    rng = np.random.default_rng(1)
    assert graphs.can_run(_step(rng, [0, 0], [30, 70]))
    assert not graphs.can_run(_step(rng, [0, 0], [30, 71])), "101 tokens exceed the largest graph"
    assert not graphs.can_run(_step(rng, [0] * 33, [1] * 33)), "33 sequences exceed max_num_seqs"
