"""PinnedStaging off CUDA (the CPU engine's path): puts, padding, and the shape checks; TokenBuffers."""
import numpy as np
import pytest
import torch

from workers.pinned_staging import PinnedStaging, TokenBuffers, step_input_bytes


def test_put_with_fill_pads_and_checks_shapes():
    staging = PinnedStaging(step_input_bytes(16, 4, 2), torch.device("cpu"))
    staging.begin_step()
    seq_lens = torch.full((4,), 7, dtype=torch.int32)
    staging.put(seq_lens, np.array([5, 9], dtype=np.int32), fill=0)
    assert seq_lens.tolist() == [5, 9, 0, 0]
    tables = torch.full((4, 3), 7, dtype=torch.int32)
    staging.put(tables, np.ones((1, 3), dtype=np.int32), fill=-1)  # rows past the array: all fill
    assert tables.tolist() == [[1, 1, 1]] + [[-1] * 3] * 3
    big = torch.zeros(1000, dtype=torch.int64)  # over the arena: staged alone, padded the same way
    staging.put(big, np.arange(10, dtype=np.int64), fill=-1)
    assert big[:10].tolist() == list(range(10)) and (big[10:] == -1).all()
    with pytest.raises(TypeError, match="dtypes and shapes must match"):
        staging.put(seq_lens[:1], np.array([5, 9], dtype=np.int32), fill=0)  # more rows than dst
    with pytest.raises(TypeError, match="dtypes and shapes must match"):
        staging.put(tables, np.ones((2, 2), dtype=np.int32), fill=0)  # another row width
    staging.end_step()


def test_token_buffers_are_reused_only_once_given_back():
    pool = TokenBuffers(8, pinned=False)
    first, second = pool.take(3), pool.take(8)
    assert first.dtype == torch.int64 and len(first) == len(second) == 8
    assert first.data_ptr() != second.data_ptr(), "a buffer not given back is never handed out again"
    pool.give_back(first)
    assert pool.take(5).data_ptr() == first.data_ptr()
    assert pool.take(2).data_ptr() not in (first.data_ptr(), second.data_ptr())
    big = pool.take(9)  # more tokens than a step samples: a buffer of its own, never pooled
    assert len(big) == 9
    pool.give_back(big)
    assert not pool._free
