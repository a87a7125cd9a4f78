"""PinnedStaging off CUDA (the CPU engine's path): puts, padding, and the shape checks."""
import numpy as np
import pytest
import torch

from workers.pinned_staging import PinnedStaging, step_input_bytes


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
