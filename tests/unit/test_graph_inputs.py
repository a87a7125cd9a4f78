"""PackedInputs (workers/graph_inputs.py) off CUDA: typed views of one buffer, one copy a step."""
import numpy as np
import pytest
import torch

from workers.graph_inputs import PackedInputs
from workers.pinned_staging import PinnedStaging


def _fields(rows: int) -> list:
    return [("ids", torch.long, (rows,)), ("lens", torch.int32, (rows,)), ("tables", torch.int32, (rows, 5))]


def test_views_share_one_buffer_and_a_put_fills_padding():
    buffer = torch.zeros(PackedInputs.packed_bytes(_fields(4)), dtype=torch.uint8)
    packed = PackedInputs(_fields(4), buffer)
    assert all(v.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for v in packed.views.values())
    packed.reset({"ids": 7, "lens": 7, "tables": 7})
    staging = PinnedStaging(4096, torch.device("cpu"))
    staging.begin_step()
    packed.put(staging, {"ids": (np.array([3, 4], dtype=np.int64), 0), "lens": (np.array([9, 2], dtype=np.int32), 0),
                         "tables": (np.array([[1, 2], [3, 4]], dtype=np.int32), None)}, live_rows=2)
    v = packed.views
    assert v["ids"].tolist() == [3, 4, 0, 0] and v["lens"].tolist() == [9, 2, 0, 0]
    assert v["tables"][:2, :2].tolist() == [[1, 2], [3, 4]]
    assert v["tables"][2:].eq(7).all(), "rows past the live ones are not copied"


def test_a_smaller_layout_views_the_same_bytes_from_the_start():
    buffer = torch.zeros(PackedInputs.packed_bytes(_fields(8)), dtype=torch.uint8)
    small, large = PackedInputs(_fields(2), buffer), PackedInputs(_fields(8), buffer)
    assert small.views["ids"].data_ptr() == large.views["ids"].data_ptr()
    assert small.num_bytes < large.num_bytes


def test_put_refuses_what_does_not_fit_and_stages_past_the_arena():
    buffer = torch.zeros(PackedInputs.packed_bytes(_fields(64)), dtype=torch.uint8)
    packed = PackedInputs(_fields(64), buffer)
    staging = PinnedStaging(128, torch.device("cpu"))  # smaller than the layout: memory of its own
    staging.begin_step()
    with pytest.raises(TypeError, match="ids: a int32 array"):
        packed.put(staging, {"ids": (np.zeros(3, dtype=np.int32), 0)}, live_rows=0)
    with pytest.raises(TypeError, match="tables"):
        packed.put(staging, {"tables": (np.zeros((2, 6), dtype=np.int32), None)}, live_rows=2)
    packed.put(staging, {"ids": (np.arange(64, dtype=np.int64), None),
                         "tables": (np.ones((64, 5), dtype=np.int32), None)}, live_rows=64)
    assert packed.views["ids"].tolist() == list(range(64)) and packed.views["tables"].eq(1).all()


def test_views_kept_for_a_slot_write_each_step_afresh():
    """put() keeps its typed views of a staging slot: a later step through the same slot, with
    fewer rows, writes its own values and padding, none of the earlier step's."""
    buffer = torch.zeros(PackedInputs.packed_bytes(_fields(4)), dtype=torch.uint8)
    packed = PackedInputs(_fields(4), buffer)
    staging = PinnedStaging(4096, torch.device("cpu"), num_arenas=1)
    for ids, lens, tables in [([5, 6, 7], [1, 2, 3], [[1, 1], [2, 2], [3, 3]]), ([8], [4], [[9, 9, 9]])]:
        staging.begin_step()
        packed.put(staging, {"ids": (np.array(ids, dtype=np.int64), 0), "lens": (np.array(lens, dtype=np.int32), -1),
                             "tables": (np.array(tables, dtype=np.int32), None)}, live_rows=len(ids))
        v = packed.views
        assert v["ids"].tolist() == ids + [0] * (4 - len(ids))
        assert v["lens"].tolist() == lens + [-1] * (4 - len(lens))
        assert v["tables"][:len(ids), :len(tables[0])].tolist() == tables
    assert len(packed._host_views) == 1, "one slot, one set of views"


def test_kept_views_are_bounded_and_still_correct_past_the_bound():
    from workers.graph_inputs import MAX_KEPT_SLOTS

    buffer = torch.zeros(PackedInputs.packed_bytes(_fields(4)), dtype=torch.uint8)
    packed = PackedInputs(_fields(4), buffer)
    staging = PinnedStaging(1 << 16, torch.device("cpu"), num_arenas=1)
    for k in range(3 * MAX_KEPT_SLOTS):  # a different start each step: something staged first
        staging.begin_step()
        staging.region(64 * (k + 1))
        packed.put(staging, {"ids": (np.array([k, k + 1], dtype=np.int64), 0)}, live_rows=0)
        assert packed.views["ids"].tolist() == [k, k + 1, 0, 0]
        assert len(packed._host_views) <= MAX_KEPT_SLOTS
