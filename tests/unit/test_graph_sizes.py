import numpy as np

from workers.attention.row_groups import decode_tile_rows, query_row_groups, rows_per_program
from workers.cuda_graphs import MAX_QUERY_ROWS, as_decode_rows, capture_sizes, prefill_token_sizes
from workers.input_batch import StepInputs


def test_prefill_sizes_cover_every_step_within_the_budget():
    sizes = prefill_token_sizes(16384)
    assert sizes[:13] == [4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert 2048 + 256 in sizes and 8192 in sizes and 8192 + 1024 in sizes and sizes[-1] == 16384
    assert prefill_token_sizes(10000)[-2:] == [9216, 10000]
    assert prefill_token_sizes(24) == [4, 8, 16, 24]
    assert prefill_token_sizes(8) == [4, 8]
    assert prefill_token_sizes(3) == [3]
    for budget in (3, 8, 24, 100, 2048, 2049, 5000, 16384, 20000):
        sizes = prefill_token_sizes(budget)
        assert sizes == sorted(set(sizes)) and sizes[-1] == budget
        # a step of a + 1 tokens pads to b: by at most a quarter past 512 tokens, an eighth past 2048
        for a, b in zip(sizes, sizes[1:]):
            assert b - a <= max(128, a // 4 if a < 2048 else a // 8), (a, b)


def test_decode_sizes_reach_max_num_seqs():
    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def _inputs(context_lens: list[int], query_lens: list[int], tables: list[list[int]]) -> StepInputs:
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(context_lens, query_lens)]).astype(np.int64)
    block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = t
    req_ids = [f"r{i}" for i in range(len(tables))]
    n = int(qsl[-1])
    return StepInputs(req_ids, np.arange(n, dtype=np.int64), positions, np.zeros(n, dtype=np.int64), qsl,
                      (np.asarray(context_lens) + np.asarray(query_lens)).astype(np.int32), block_tables,
                      (qsl[1:] - 1).astype(np.int64), req_ids, [], list(query_lens))


def test_decode_rows_give_each_query_token_its_causal_context_and_its_sequences_blocks():
    # a decode, a prefix-cache hit of 3 new tokens over 32 cached, and a 2-token chunk of a fresh prompt
    step = _inputs([9, 32, 0], [1, 3, 2], [[5], [7, 8, 9], [4]])
    seq_lens, tables = as_decode_rows(step)
    row_groups = query_row_groups(np.diff(step.query_start_loc), group=2)
    assert seq_lens.tolist() == [10, 33, 34, 35, 1, 2]
    assert tables.tolist() == [[5, 0, 0], [7, 8, 9], [7, 8, 9], [7, 8, 9], [4, 0, 0], [4, 0, 0]]
    # each query's rows go to the program of its first row; the decode row has its own
    assert row_groups.tolist() == [1, 3, 0, 0, 2, 0]
    assert seq_lens.dtype == np.int32 and tables.dtype == np.int32 and row_groups.dtype == np.int32


def test_a_decode_only_step_keeps_its_rows():
    step = _inputs([9, 40], [1, 1], [[5], [6, 7, 8]])
    seq_lens, tables = as_decode_rows(step)
    assert seq_lens is step.seq_lens and tables is step.block_tables
    assert MAX_QUERY_ROWS >= 4, "a prefix-cache hit's few new tokens should fit the decode graphs"


def test_row_groups_fill_the_decode_tile_with_one_querys_rows():
    # the tile has a row per query head of a kv head, at least 16: Qwen3-0.6B's 2 heads leave
    # room for 8 query rows, 8B's 4 for 4, 32B's 8 for 2; 5 heads pad to 8 (16 rows: 3 fit)
    assert [decode_tile_rows(g) for g in (1, 2, 4, 5, 8, 16, 32)] == [16, 16, 16, 16, 16, 16, 32]
    assert [rows_per_program(g) for g in (1, 2, 4, 5, 8, 16, 32)] == [16, 8, 4, 3, 2, 1, 1]
    assert rows_per_program(2) >= MAX_QUERY_ROWS, "0.6B's longest query as rows should take one program"
    # a query longer than a program takes is cut into chunks, each led by its first row
    assert query_row_groups(np.array([1, 9, 3]), group=2).tolist() == [1, 8, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0]
    assert query_row_groups(np.array([7, 1]), group=4).tolist() == [4, 0, 0, 0, 3, 0, 0, 1]
    assert query_row_groups(np.array([3]), group=16).tolist() == [1, 1, 1]
    for lens, group in (([1, 9, 3], 2), ([7, 1, 2], 4), ([5, 5], 8), ([8], 5)):
        groups = query_row_groups(np.array(lens), group)
        # every row is taken by exactly one program, never one past its own query's rows
        covered = [r for lead, g in enumerate(groups.tolist()) for r in range(lead, lead + g)]
        assert covered == list(range(sum(lens)))
        starts = np.concatenate([[0], np.cumsum(lens)])
        for lead, g in enumerate(groups.tolist()):
            if g:
                query = np.searchsorted(starts, lead, side="right") - 1
                assert lead + g <= starts[query + 1] and g <= rows_per_program(group)
