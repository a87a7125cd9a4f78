"""ModelRunner._sampled_rows: the hidden rows the lm_head reads, a slice where they are consecutive."""
import numpy as np
import pytest
import torch

from workers.model_runner import ModelRunner


@pytest.mark.parametrize("indices,sliced", [
    ([5], True),            # a prompt's or a prefix hit's last row
    ([0, 1, 2, 3], True),   # a decode batch
    ([2, 3, 4], True),      # a consecutive run past a chunk that does not sample
    ([1, 3, 5], False),     # several queries: their last rows are apart
    ([0, 5], False),
    ([], False),            # nothing samples (a partial prefill)
])
def test_sampled_rows_equal_the_gather(indices, sliced):
    uploads = []
    runner = ModelRunner.__new__(ModelRunner)  # only what _sampled_rows reads
    runner._to_device = lambda a: uploads.append(a) or torch.from_numpy(a)
    hidden = torch.arange(24.0).view(6, 4)
    rows = runner._sampled_rows(hidden, np.array(indices, dtype=np.int64))
    assert torch.equal(rows, hidden[torch.tensor(indices, dtype=torch.long)])
    shares_storage = rows.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr()
    assert shares_storage == sliced and len(uploads) == (0 if sliced else 1)
