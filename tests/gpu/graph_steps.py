"""What the graph tests share (test_prefill_graphs.py, test_decode_graphs.py): a tiny float32 model
on the Triton backend, steps of sequences on random blocks, and the check of a graph's step
against the eager model. Imported by a test module, it skips that module where Triton kernels
cannot run (tests.gpu.triton_device)."""
import numpy as np
import pytest
import torch

from tests.gpu.triton_device import triton_device

DEVICE = triton_device()

pytest.importorskip("triton")
from workers.attention.base import AttentionMetadata  # noqa: E402
from workers.attention.triton_backend import TritonBackend  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.input_batch import StepInputs  # noqa: E402
from workers.kv_cache import allocate_kv_caches  # noqa: E402
from workers.model_configs import resolve_model  # noqa: E402
from workers.pinned_staging import PinnedStaging, step_input_bytes  # noqa: E402
from workers.weight_loader import load_model  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 96
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def model_and_config(tiny_model_dir):
    hf_config, _ = resolve_model(str(tiny_model_dir))
    model_config = ModelConfig(model=str(tiny_model_dir), dtype="float32")
    model = load_model(model_config, hf_config, DEVICE, torch.float32, attn_backend=TritonBackend(DEVICE))
    return model, hf_config


def make_step(rng: np.random.Generator, context_lens: list[int], query_lens: list[int]) -> StepInputs:
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
                      block_tables, (query_start_loc[1:] - 1).astype(np.int64), req_ids, [], list(query_lens))


def make_staging(max_tokens: int, max_seqs: int) -> PinnedStaging:
    return PinnedStaging(step_input_bytes(max_tokens, max_seqs, MAX_MODEL_LEN // BLOCK_SIZE), torch.device(DEVICE))


def twin_caches(hf_config) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two equal KV caches full of random context to attend over: one for the eager model, one for
    the graphs."""
    torch.manual_seed(0)
    kv_eager = allocate_kv_caches(hf_config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device(DEVICE))
    for cache in kv_eager:
        cache.normal_()
    return kv_eager, [c.clone() for c in kv_eager]


def capture_or_stand_in(graphs, stand_in) -> None:
    """Capture every size on CUDA; under the interpreter, stand_in(graphs, size) replays eagerly
    (stand_in(graphs, size, query_rows=True) for a decode graph of query rows)."""
    if DEVICE == "cuda":
        graphs.capture()
    else:
        graphs.graphs = {size: stand_in(graphs, size) for size in graphs.sizes}
        for size in getattr(graphs, "query_sizes", []):
            graphs.query_graphs[size] = stand_in(graphs, size, query_rows=True)


def _eager(model, step: StepInputs, kv_caches) -> torch.Tensor:
    def dev(a):
        return torch.from_numpy(a).to(DEVICE)

    metadata = AttentionMetadata(dev(step.slot_mapping), dev(step.query_start_loc), dev(step.seq_lens),
                                 dev(step.block_tables), step.query_start_loc.tolist(), step.seq_lens.tolist(),
                                 int(np.diff(step.query_start_loc).max()), int(step.seq_lens.max()))
    return model(dev(step.input_ids), dev(step.positions), kv_caches, metadata)


def check_step_against_eager(graphs, model, step: StepInputs, kv_eager, kv_graph) -> None:
    """graphs.run(step) gives the eager model's hidden states, and leaves the graphs' cache as the
    eager step leaves its own: padding wrote nowhere, real tokens where eager did."""
    graphs.staging.begin_step()
    hidden = graphs.run(step).clone()
    graphs.staging.end_step()
    expected = _eager(model, step, kv_eager)
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)
    for got, want in zip(kv_graph, kv_eager):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
