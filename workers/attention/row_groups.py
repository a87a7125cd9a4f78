"""Which decode rows share a program of the decode kernel (workers/attention/triton_decode.py).

A prefix-cache hit's few new tokens run as decode rows of one sequence (workers/cuda_graphs.py),
each over its own context, all through one block table. The kernel's tile has a row per query
head of a kv head, padded to 16 for tl.dot: with Qwen3-0.6B's 2 query heads per kv head, 14 of
its 16 rows were padding, and each of the hit's rows read the whole cached context again. With
row groups one program takes up to 8 such rows and reads each K/V tile once for all of them.

Host-side numpy only: the CPU engine imports this without Triton.
"""
from collections.abc import Sequence

import numpy as np


def decode_tile_rows(group: int) -> int:
    """The decode kernel's tile height: the GQA group (query heads per kv head), padded to 16."""
    return max(16, 1 << (group - 1).bit_length())


def rows_per_program(group: int) -> int:
    """The most query rows of one sequence a program takes: their heads share its tile."""
    return max(1, decode_tile_rows(group) // group)


def query_row_groups(query_lens: Sequence[int], group: int) -> np.ndarray:
    """The kernel's row_groups for rows laid out as each sequence's query tokens in order
    (query_lens[i] rows for sequence i): each query in chunks of rows_per_program(group) rows,
    the chunk's first row holding its length and the others 0. A 1-token query holds 1.
    Built as a list: a step with a query has at most a few rows here (cuda_graphs.MAX_QUERY_ROWS)."""
    cap = rows_per_program(group)
    groups = []
    for n in query_lens:
        for lead in range(0, n, cap):
            rows = min(cap, n - lead)
            groups.append(rows)
            groups.extend([0] * (rows - 1))
    return np.array(groups, dtype=np.int32)
