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

from tests.gpu.graph_steps import (DEVICE, MAX_MODEL_LEN, BLOCK_SIZE, capture_or_stand_in, check_step_against_eager,
                                   make_staging, make_step, model_and_config, twin_caches)
from workers.cuda_graphs import PrefillGraphs

pytestmark = [pytest.mark.gpu]
__all__ = ["model_and_config"]  # the module-scoped fixture, shared with test_decode_graphs.py


class _EagerReplay:
    """Stands in for a captured graph under the interpreter: replay runs the model on the buffers."""

    def __init__(self, graphs: PrefillGraphs, num_tokens: int):
        self.graphs, self.num_tokens = graphs, num_tokens

    def replay(self) -> None:
        self.graphs.forward(self.num_tokens)


@torch.inference_mode()
def test_prefill_graphs_match_eager_steps(model_and_config):
    model, hf_config = model_and_config
    kv_eager, kv_graph = twin_caches(hf_config)
    graphs = PrefillGraphs(model, kv_graph, max_num_seqs=32, max_num_batched_tokens=256,
                           max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, device=torch.device(DEVICE),
                           staging=make_staging(256, 32))
    assert graphs.sizes == [4, 8, 16, 32, 64, 128, 256] and graphs.max_seqs == 32
    capture_or_stand_in(graphs, _EagerReplay)
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
        step = make_step(rng, ctx, q)
        assert graphs.can_run(step)
        before = graphs.replays
        check_step_against_eager(graphs, model, step, kv_eager, kv_graph)
        assert graphs.replays == before + 1


def test_prefill_graphs_refuse_what_they_cannot_hold(model_and_config):
    model, hf_config = model_and_config
    graphs = PrefillGraphs(model, [], max_num_seqs=32, max_num_batched_tokens=100,
                           max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, device=torch.device(DEVICE),
                           staging=make_staging(100, 32))
    assert graphs.sizes == [4, 8, 16, 32, 64, 100], "the step budget itself is the largest graph"
    rng = np.random.default_rng(1)
    assert graphs.can_run(make_step(rng, [0, 0], [30, 70]))
    assert not graphs.can_run(make_step(rng, [0, 0], [30, 71])), "101 tokens exceed the largest graph"
    assert not graphs.can_run(make_step(rng, [0] * 33, [1] * 33)), "33 sequences exceed max_num_seqs"
