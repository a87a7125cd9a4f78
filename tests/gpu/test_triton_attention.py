"""Triton attention kernels and TritonBackend against a float64 torch reference.

Skipped without CUDA. With TRITON_INTERPRET=1 (and triton installed) the float32/float16 cases
also run on the CPU through Triton's interpreter (~2 min): handy for kernel work without a GPU.
Triton 3.6's interpreter with numpy 2 needs one local patch for loop bounds loaded from memory:
in triton/runtime/interpreter.py, `int(self.handle.data)` -> `int(self.handle.data.item())`.
"""
import random

import pytest
import torch

from tests.gpu.triton_device import triton_device

from workers.attention.base import AttentionMetadata

DEVICE = triton_device()

from workers.attention.triton_common import reshape_and_cache  # noqa: E402  (imports triton)
from workers.attention.triton_decode import paged_decode_attention  # noqa: E402
from workers.attention.triton_prefill import (  # noqa: E402
    paged_prefill_attention, prefill_tile_map, prefill_tokens_per_tile)

pytestmark = [pytest.mark.gpu]

NUM_KV_HEADS = 8
HEAD_DIM = 128
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16,
                                                                  torch.float32]
DECODE_CONTEXTS = [1, 15, 16, 17, 500, 2048, 8192]
DECODE_BATCHES = [1, 13, 64]
if DEVICE == "cpu":
    DECODE_CONTEXTS, DECODE_BATCHES = [1, 17, 70], [1, 3]


def make_cache(seq_lens: list[int], block_size: int, dtype, num_kv_heads=NUM_KV_HEADS):
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 8
    return torch.randn(2, num_blocks, block_size, num_kv_heads, HEAD_DIM, dtype=dtype,
                       device=DEVICE)


def make_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, extra_cols: int = 3):
    """Random, non-contiguous block ids; each sequence owns its blocks; padded with 0."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    ids = torch.randperm(num_blocks - 1)[: sum(blocks_per_seq)] + 1
    width = max(blocks_per_seq) + extra_cols
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = ids[start:start + n]
        start += n
    return table.to(DEVICE)


def slots_for(block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
              block_size: int) -> torch.Tensor:
    slots = []
    table = block_tables.cpu()
    for s, (n, q) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(n - q, n):
            slots.append(int(table[s, pos // block_size]) * block_size + pos % block_size)
    return torch.tensor(slots, dtype=torch.int64, device=DEVICE)


def make_metadata(seq_lens, query_lens, block_tables, block_size) -> AttentionMetadata:
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    return AttentionMetadata(
        slot_mapping=slots_for(block_tables, seq_lens, query_lens, block_size),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def write_ref(key, value, kv_cache, slot_mapping):
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    keep = slot_mapping >= 0
    flat[0, slot_mapping[keep]] = key[keep]
    flat[1, slot_mapping[keep]] = value[keep]


def attention_ref(query, kv_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
    """float64: each sequence's queries over its whole context, causal at the end."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    flat = kv_cache.view(2, -1, num_kv_heads, kv_cache.shape[4])
    table = md.block_tables.long()
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    for s, seq_len in enumerate(md.seq_lens_cpu):
        q_start, q_end = md.query_start_loc_cpu[s], md.query_start_loc_cpu[s + 1]
        if seq_len == 0 or q_end == q_start:
            continue
        pos = torch.arange(seq_len, device=query.device)
        slots = table[s, pos // block_size] * block_size + pos % block_size
        k = flat[0, slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = flat[1, slots].double().repeat_interleave(group, dim=1)
        q = query[q_start:q_end].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = seq_len - (q_end - q_start) + torch.arange(q_end - q_start, device=query.device)
        scores.masked_fill_(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def assert_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    diff = (out.double() - ref).flatten(1)
    rel = diff.norm() / ref.norm()
    assert rel < TOLERANCE[dtype], f"relative error {rel:.2e}"
    row_rel = (diff.norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-6)).max()
    assert row_rel < 5 * TOLERANCE[dtype], f"worst row relative error {row_rel:.2e}"


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache(dtype, block_size):
    num_tokens = 77
    kv_cache = make_cache([2048], block_size, dtype)
    expected = kv_cache.clone()
    slots = torch.randperm(kv_cache.shape[1] * block_size)[:num_tokens].to(DEVICE)
    slots[::7] = -1  # padding rows
    # a non-contiguous view, as when K/V are slices of a fused qkv projection
    qkv = torch.randn(num_tokens, 3, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    key, value = qkv[:, 1], qkv[:, 2]
    reshape_and_cache(key, value, kv_cache, slots)
    write_ref(key, value, expected, slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("context", DECODE_CONTEXTS)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [2, 4])
def test_decode(context, batch, block_size, group):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    rng = random.Random(context * 1000 + batch)
    seq_lens = [rng.randint(1, context) for _ in range(batch - 1)] + [context]
    kv_cache = make_cache(seq_lens, block_size, dtype)
    tables = make_block_tables(seq_lens, block_size, kv_cache.shape[1])
    md = make_metadata(seq_lens, [1] * batch, tables, block_size)
    query = 2 * torch.randn(batch, NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=DEVICE)
    scale = HEAD_DIM ** -0.5
    ref = attention_ref(query, kv_cache, md, scale)
    for num_splits in sorted({1, 3, min(64, -(-context // 64))}):
        for fused_merge in ([True, False] if num_splits > 1 else [True]):
            out = poisoned(query.shape, dtype)
            paged_decode_attention(query, kv_cache, md.block_tables, md.seq_lens,
                                   scale, num_splits, out=out, fused_merge=fused_merge)
            assert_close(out, ref, dtype)
            again = paged_decode_attention(
                query, kv_cache, md.block_tables, md.seq_lens, scale, num_splits,
                fused_merge=fused_merge)
            assert torch.equal(out, again), "a second run differs: a race"
            # the program order changes which program takes which sequence, never a value
            for order in (torch.argsort(md.seq_lens, descending=True), torch.randperm(batch, device=DEVICE)):
                ordered = paged_decode_attention(
                    query, kv_cache, md.block_tables, md.seq_lens, scale, num_splits,
                    fused_merge=fused_merge, order=order.to(torch.int32))
                assert torch.equal(out, ordered), "the longest-first order changed the output"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [2, 4, 5])
def test_decode_dtypes_groups_and_empty_rows(dtype, group):
    seq_lens = [300, 0, 1, 1000, 0]  # seq_len 0: a CUDA-graph padding row, output 0
    block_size = 16
    kv_cache = make_cache([max(1, n) for n in seq_lens], block_size, dtype)
    tables = make_block_tables([max(1, n) for n in seq_lens], block_size, kv_cache.shape[1])
    md = make_metadata(seq_lens, [1] * len(seq_lens), tables, block_size)
    query = torch.randn(len(seq_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=DEVICE)
    ref = attention_ref(query, kv_cache, md, 0.1)
    for num_splits, fused_merge in [(1, True), (4, True), (4, False)]:
        out = poisoned(query.shape, dtype)
        paged_decode_attention(query, kv_cache, md.block_tables, md.seq_lens, 0.1,
                               num_splits, out=out, fused_merge=fused_merge)
        assert_close(out, ref, dtype)
        assert (out[1] == 0).all() and (out[4] == 0).all()


@pytest.mark.parametrize("group", [2, 4])
def test_decode_row_groups_take_a_querys_rows_in_one_program(group):
    """One sequence's query tokens as decode rows (a prefix-cache hit in a decode graph): rows that
    share a program each see their own causal context, as they do in programs of their own."""
    from workers.attention.row_groups import query_row_groups

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    block_size = 16
    context = 2000 if DEVICE == "cuda" else 90
    # a decode, a 4-token hit, a padding row (no context), a 9-token query (more rows than a
    # program takes), a decode: (cached tokens, query tokens)
    queries = [(300, 1), (context, 4), (-1, 1), (70, 9), (5, 1)]
    totals = [c + q for c, q in queries]
    kv_cache = make_cache([max(1, n) for n in totals], block_size, dtype)
    seq_tables = make_block_tables([max(1, n) for n in totals], block_size, kv_cache.shape[1])
    query_lens = torch.tensor([q for _, q in queries])
    rows = torch.repeat_interleave(torch.arange(len(queries)), query_lens)
    row_lens = [c + i + 1 if c >= 0 else 0 for c, q in queries for i in range(q)]
    tables = seq_tables[rows.to(DEVICE)]
    md = make_metadata(row_lens, [1] * len(row_lens), tables, block_size)
    row_groups = torch.from_numpy(query_row_groups(query_lens.numpy(), group)).to(DEVICE)
    assert row_groups.tolist() == [1, 4, 0, 0, 0, 1, *([8, 0, 0, 0, 0, 0, 0, 0, 1] if group == 2 else
                                                        [4, 0, 0, 0, 4, 0, 0, 0, 1]), 1]
    query = torch.randn(len(row_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=DEVICE)
    ref = attention_ref(query, kv_cache, md, 0.1)
    for num_splits in (1, 3, 17):
        alone = paged_decode_attention(query, kv_cache, md.block_tables, md.seq_lens, 0.1, num_splits)
        out = poisoned(query.shape, dtype)
        paged_decode_attention(query, kv_cache, md.block_tables, md.seq_lens, 0.1, num_splits, out=out,
                               row_groups=row_groups)
        assert_close(out, ref, dtype)
        assert_close(alone, ref, dtype)
        assert (out[5] == 0).all(), "a padding row's output is zero"
        again = paged_decode_attention(query, kv_cache, md.block_tables, md.seq_lens, 0.1, num_splits,
                                       row_groups=row_groups,
                                       order=torch.randperm(len(row_lens), device=DEVICE).to(torch.int32))
        assert torch.equal(out, again), "the program order or a second run changed a value"
        # a plain decode row is computed exactly as without groups
        for r in (0, len(row_lens) - 1):
            assert torch.equal(out[r], alone[r])


PREFILL_CASES = {
    # name: (context lengths before the step, query lengths)
    "no_prefix": ([0, 0, 0, 0, 0], [1, 17, 100, 257, 1000]),
    "chunked_over_prefix": ([16, 500, 1, 2000, 33], [64, 1, 300, 129, 200]),
    "mixed_decode_and_prefill": ([40, 0, 700, 15, 3000, 0], [1, 90, 1, 1, 1, 512]),
}
if DEVICE == "cpu":
    PREFILL_CASES = {"small_mixed": ([0, 5, 40, 0], [9, 1, 20, 33])}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [2, 4, 5])
def test_prefill(case, dtype, block_size, group):
    ctx_lens, query_lens = PREFILL_CASES[case]
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    kv_cache = make_cache(seq_lens, block_size, dtype)
    tables = make_block_tables(seq_lens, block_size, kv_cache.shape[1])
    md = make_metadata(seq_lens, query_lens, tables, block_size)
    query = 2 * torch.randn(sum(query_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype,
                            device=DEVICE)
    scale = HEAD_DIM ** -0.5
    ref = attention_ref(query, kv_cache, md, scale)
    for num_splits in (1, 3):  # split keys: most slices of the short tiles are empty
        out = poisoned(query.shape, dtype)
        paged_prefill_attention(query, kv_cache, md.block_tables, md.seq_lens,
                                md.query_start_loc, scale, out=out, num_splits=num_splits)
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_split_keys_over_a_long_prefix(dtype):
    """A prefix-cache hit: a few query tokens over a long cached context, with the keys split in
    up to 32 slices (as TritonBackend chooses for such a step) and fewer programs than (tile,
    slice) items, equals the reference."""
    ctx_lens, query_lens = ([2048, 700], [4, 1]) if DEVICE == "cuda" else ([300, 70], [4, 1])
    block_size, group = 16, 2
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    kv_cache = make_cache(seq_lens, block_size, dtype)
    md = make_metadata(seq_lens, query_lens, make_block_tables(seq_lens, block_size, kv_cache.shape[1]),
                       block_size)
    query = 2 * torch.randn(sum(query_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=DEVICE)
    ref = attention_ref(query, kv_cache, md, 0.09)
    whole = paged_prefill_attention(query, kv_cache, md.block_tables, md.seq_lens,
                                    md.query_start_loc, 0.09)
    assert_close(whole, ref, dtype)
    # a few programs walk many items; and tiles of 32 rows (16 tokens of a group of 2), the shape
    # attention_bench --prefix-hit times against the default 128
    for num_splits, programs, block_m in [(2, None, 128), (5, 3, 128), (32, 7, 128), (32, None, 32), (5, 3, 32),
                                         (32, None, 64)]:
        out = poisoned(query.shape, dtype)
        paged_prefill_attention(query, kv_cache, md.block_tables, md.seq_lens,
                                md.query_start_loc, 0.09, out=out, num_splits=num_splits,
                                split_programs=programs, block_m=block_m,
                                num_warps=8 if block_m == 128 else 4)  # as TritonBackend
        assert_close(out, ref, dtype)


def test_prefill_split_count():
    """Splits only where the step's tiles leave SMs idle, and never past the partials' row bound."""
    from workers.attention.triton_backend import TritonBackend

    backend = TritonBackend(DEVICE)
    backend.num_sms = 132  # an H100's count, whatever runs the test
    assert backend.num_prefill_splits(4, NUM_KV_HEADS, 2, 4096) == 32  # a prefix-cache hit
    assert backend.num_prefill_splits(4, NUM_KV_HEADS, 2, 100) == 2  # eager: its context bounds it
    assert backend.num_prefill_splits(64, NUM_KV_HEADS, 2, 4096) == 32  # the largest step split
    assert backend.num_prefill_splits(128, NUM_KV_HEADS, 2, 4096) == 1  # a fresh prompt's graph
    assert backend.num_prefill_splits(2048, NUM_KV_HEADS, 2, 4096) == 1  # 256 programs fill the SMs
    assert backend.num_prefill_splits(16384, NUM_KV_HEADS, 2, 4096) == 1


def test_prefill_tiles_skip_empty_queries_and_padding():
    """The flat tile grid: sequences with no query own no tile, padded sequences (seq_len 0) and
    padded query rows past the last sequence get none, and a tile map built for more tokens than
    the step holds (a CUDA graph's bound) leaves the extra programs empty."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    block_size, group = 16, 2
    ctx_lens, query_lens = [0, 40, 0, 7, 0], [70, 0, 1, 130, 0]  # the last row is graph padding
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    kv_cache = make_cache([max(1, n) for n in seq_lens], block_size, dtype)
    tables = make_block_tables([max(1, n) for n in seq_lens], block_size, kv_cache.shape[1])
    md = make_metadata(seq_lens, query_lens, tables, block_size)
    num_real = sum(query_lens)
    query = 2 * torch.randn(num_real + 57, NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=DEVICE)
    ref = attention_ref(query[:num_real], kv_cache, md, HEAD_DIM ** -0.5)
    tpt = prefill_tokens_per_tile(group)
    tile_starts, tile_seq = prefill_tile_map(md.query_start_loc, query.shape[0], tpt)
    tiles = [-(-q // tpt) for q in query_lens]
    assert tile_starts.tolist() == [sum(tiles[:i]) for i in range(len(tiles) + 1)]
    assert tile_seq[:sum(tiles)].tolist() == [s for s, n in enumerate(tiles) for _ in range(n)]
    assert tile_seq.shape[0] > sum(tiles)  # the bound leaves empty programs
    for num_splits in (1, 4):
        out = poisoned(query.shape, dtype)
        paged_prefill_attention(query, kv_cache, md.block_tables, md.seq_lens,
                                md.query_start_loc, HEAD_DIM ** -0.5, out=out,
                                tile_map=(tile_starts, tile_seq), num_splits=num_splits)
        assert_close(out[:num_real], ref, dtype)
        assert torch.isnan(out[num_real:].float()).all(), "a padded query row was written"


def backend_ref(query, key, value, kv_cache, md, scale):
    """The team's TorchRefBackend in float64 on a copy of the cache -> (out, cache after the write)."""
    from workers.attention.torch_ref import TorchRefBackend

    cache64 = kv_cache.double()
    out = TorchRefBackend().forward(query.double(), key.double(), value.double(), cache64, md, scale)
    return out, cache64.to(kv_cache.dtype)


@pytest.mark.parametrize("ctx_lens,query_lens", [
    ([5, 900, 2047, 0], [1, 1, 1, 1]),  # decode only (the 0-context row is a fresh 1-token prompt)
    ([0, 130, 31, 4000], [200, 1, 77, 1]),  # mixed
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_forward(ctx_lens, query_lens, dtype):
    from workers.attention.triton_backend import TritonBackend

    block_size = 16
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    group = 2
    kv_cache = make_cache(seq_lens, block_size, dtype)
    tables = make_block_tables(seq_lens, block_size, kv_cache.shape[1])
    md = make_metadata(seq_lens, query_lens, tables, block_size)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (group + 2) * NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    query, key, value = qkv.split([group * NUM_KV_HEADS, NUM_KV_HEADS, NUM_KV_HEADS], dim=1)
    ref, ref_cache = backend_ref(query, key, value, kv_cache, md, 0.08)
    out = TritonBackend(DEVICE).forward(query, key, value, kv_cache, md, 0.08)
    assert torch.equal(kv_cache, ref_cache)
    assert_close(out, ref, dtype)


def capture(step):
    """A CUDA graph of step() (compiled first, outside the capture); on the CPU, step itself."""
    if DEVICE != "cuda":
        return step(), step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return out, graph.replay


def test_decode_cuda_graph_replay():
    """Capture one decode step for 8 rows, replay it with new contexts, lengths and a padding row."""
    from workers.attention.triton_backend import TritonBackend

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    block_size, batch, group = 16, 8, 2
    max_len = 4096 if DEVICE == "cuda" else 200
    # the interpreter's backend sees 4 "SMs": force the split path there too
    backend = TritonBackend(DEVICE, fixed_decode_splits=None if DEVICE == "cuda" else 3)
    kv_cache = make_cache([max_len] * batch, block_size, dtype)
    static = make_metadata([max_len] * batch, [1] * batch,
                           make_block_tables([max_len] * batch, block_size, kv_cache.shape[1]),
                           block_size)
    width = static.block_tables.shape[1]
    query = torch.randn(batch, group * NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    key = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    value = torch.randn_like(key)
    assert backend.num_decode_splits(batch, NUM_KV_HEADS, max_len) > 1  # the split path is captured
    out, replay = capture(lambda: backend.forward(query, key, value, kv_cache, static, 0.1))

    for trial in range(3):
        seq_lens = [random.randint(1, max_len) for _ in range(batch - 1)] + [0]
        tables = make_block_tables([max(1, n) for n in seq_lens], block_size, kv_cache.shape[1],
                                   extra_cols=width)[:, :width]
        fresh = make_metadata(seq_lens, [1] * batch, tables, block_size)
        fresh.slot_mapping[-1] = -1  # padding row writes nothing
        static.block_tables.copy_(tables)
        static.seq_lens.copy_(fresh.seq_lens)
        static.slot_mapping.copy_(fresh.slot_mapping)
        for t in (query, key, value):
            t.copy_(torch.randn_like(t))
        ref, ref_cache = backend_ref(query, key, value, kv_cache, fresh, 0.1)
        out.fill_(float("nan"))
        got = replay()
        out = out if got is None else got  # the graph refills its own output buffer
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert torch.equal(kv_cache, ref_cache)
        assert_close(out, ref, dtype)
        assert (out[-1] == 0).all()
