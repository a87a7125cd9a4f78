"""DecodeGraphs (workers/cuda_graphs.py) against the eager model: decode-only steps, and steps whose
short queries (a prefix-cache hit's few new tokens, a prompt's short chunk) run one row per token.
The hidden states and the whole KV cache must come out as the eager prefill path makes them.

On CUDA the graphs are captured for real; under Triton's CPU interpreter (TRITON_INTERPRET=1) each
"graph" re-runs the model on the static buffers at replay.
"""
import numpy as np
import pytest
import torch

from tests.gpu.graph_steps import (DEVICE, MAX_MODEL_LEN, BLOCK_SIZE, capture_or_stand_in, check_step_against_eager,
                                   make_staging, make_step, model_and_config, twin_caches)
from workers.cuda_graphs import MAX_QUERY_ROWS, DecodeGraphs

pytestmark = [pytest.mark.gpu]
__all__ = ["model_and_config"]  # the module-scoped fixture of tests.gpu.graph_steps


class _EagerReplay:
    """Stands in for a captured graph under the interpreter: replay runs the model on the buffers."""

    def __init__(self, graphs: DecodeGraphs, bs: int, query_rows: bool = False):
        self.graphs, self.bs, self.query_rows = graphs, bs, query_rows

    def replay(self) -> None:
        outputs = self.graphs.query_outputs if self.query_rows else self.graphs.outputs
        outputs[self.bs] = self.graphs.model(*self.graphs.args(self.bs, self.query_rows))


@torch.inference_mode()
def test_short_queries_as_decode_rows_match_the_eager_prefill(model_and_config):
    model, hf_config = model_and_config
    kv_eager, kv_graph = twin_caches(hf_config)
    graphs = DecodeGraphs(model, kv_graph, max_num_seqs=32, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                          device=torch.device(DEVICE), staging=make_staging(256, 32))
    capture_or_stand_in(graphs, _EagerReplay)
    replayed = []  # the sizes of the query-row graphs replayed
    for size, graph in list(graphs.query_graphs.items()):
        graphs.query_graphs[size] = _Counted(graph, size, replayed)
    rng = np.random.default_rng(0)
    steps = [
        ([40, 17, 90, 3, 60, 7, 8, 9, 10, 11], [1] * 10),  # decodes: 10 rows pad to 16, stale below
        ([300], [4]),  # a prefix-cache hit: 4 new tokens over a long cached context
        ([300], [MAX_QUERY_ROWS]),  # the longest query taken as rows
        ([20, 33, 200, 16], [1, 1, 7, 1]),  # decodes beside a hit's new tokens
        ([0, 5], [3, 2]),  # fresh short prompts: a query attends only to itself
    ]
    for ctx, q in steps:
        step = make_step(rng, ctx, q)
        assert graphs.can_run(step)
        before = graphs.query_row_steps
        check_step_against_eager(graphs, model, step, kv_eager, kv_graph)
        assert graphs.query_row_steps == before + (max(q) > 1)
    # a query's rows share decode programs in steps of at most MAX_QUERY_ROWS rows (4, 8 and the
    # two fresh prompts' 5, padded to 8); the 10 rows beside three decodes pad to 16: plain rows
    assert replayed == [4, MAX_QUERY_ROWS, 8]


class _Counted:
    def __init__(self, graph, size: int, replayed: list):
        self.graph, self.size, self.replayed = graph, size, replayed

    def replay(self) -> None:
        self.replayed.append(self.size)
        self.graph.replay()


def test_decode_graphs_refuse_long_queries_and_too_many_rows(model_and_config):
    model, _ = model_and_config
    graphs = DecodeGraphs(model, [], max_num_seqs=32, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                          device=torch.device(DEVICE), staging=make_staging(256, 32))
    rng = np.random.default_rng(1)
    assert graphs.can_run(make_step(rng, [100, 0], [MAX_QUERY_ROWS, 1]))
    assert not graphs.can_run(make_step(rng, [100], [MAX_QUERY_ROWS + 1])), "a longer query goes to the prefill graphs"
    assert graphs.can_run(make_step(rng, list(range(32)), [1] * 32))
    assert not graphs.can_run(make_step(rng, list(range(33)), [1] * 33)), "33 rows exceed the largest graph"
    assert not graphs.can_run(make_step(rng, [60] * 5, [MAX_QUERY_ROWS] * 5)), "40 rows exceed the largest graph"
