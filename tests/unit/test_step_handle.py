"""StepHandle.token_source: the next step's input tokens taken from a step still in flight."""
import numpy as np
import pytest
import torch

from workers.model_runner import StepHandle


def _handle(tokens: list[int], req_ids: list[str]) -> StepHandle:
    handle = StepHandle.__new__(StepHandle)  # only what token_source reads: no runner, no device
    handle.token_ids = torch.tensor(tokens, dtype=torch.long)
    handle.row_of = {r: i for i, r in enumerate(req_ids)}
    return handle


def _fill(handle: StepHandle, req_ids: list[str], positions: list[int]) -> tuple[torch.Tensor, int]:
    uploads = []

    def to_device(a: np.ndarray) -> torch.Tensor:
        uploads.append(a)
        return torch.from_numpy(a)

    input_ids = torch.full((8,), -1, dtype=torch.long)
    handle.token_source(req_ids, positions, to_device)(input_ids)
    return input_ids, len(uploads)


@pytest.mark.parametrize("req_ids,positions,uploads", [
    (["a", "b", "c"], [0, 1, 2], 0),  # the same rows in the same order: one slice copy
    (["b", "c"], [3, 4], 0),          # a contiguous run of rows into a contiguous run of positions
    (["c", "a"], [0, 1], 2),          # reordered rows: gather and scatter through uploaded indices
    (["a", "c"], [0, 1], 2),          # a finished sequence left a gap in the rows
    (["a", "b"], [0, 5], 2),          # positions with a gap (a prefill between the decodes)
])
def test_token_source_puts_each_token_at_its_position(req_ids, positions, uploads):
    handle = _handle([11, 22, 33], ["a", "b", "c"])
    input_ids, num_uploads = _fill(handle, req_ids, positions)
    expected = torch.full((8,), -1, dtype=torch.long)
    for req_id, pos in zip(req_ids, positions):
        expected[pos] = {"a": 11, "b": 22, "c": 33}[req_id]
    assert torch.equal(input_ids, expected)
    assert num_uploads == uploads
