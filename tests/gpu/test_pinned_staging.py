"""PinnedStaging (workers/pinned_staging.py): a step's inputs reach the device intact even when the
device is still busy with earlier steps, and an arena is rewritten only after its copies ran."""
import numpy as np
import pytest
import torch

from workers.pinned_staging import PinnedStaging, step_input_bytes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")]


def test_puts_land_intact_while_the_device_is_busy():
    device = torch.device("cuda")
    staging = PinnedStaging(step_input_bytes(64, 8, 4), device)
    rng = np.random.default_rng(0)
    sent, received = [], []
    for step in range(6):  # three rounds over the two arenas
        staging.begin_step()
        torch.cuda._sleep(2_000_000)  # the device lags the host: the copies queue behind this
        ids = rng.integers(0, 1 << 40, 64).astype(np.int64)
        table = rng.integers(0, 1000, (8, 4)).astype(np.int32)
        received.append((staging.to_device(ids), staging.to_device(table)))
        sent.append((ids, table))
        staging.end_step()
    torch.cuda.synchronize()
    for (ids, table), (got_ids, got_table) in zip(sent, received):
        assert np.array_equal(got_ids.cpu().numpy(), ids)
        assert np.array_equal(got_table.cpu().numpy(), table)


def test_a_strided_destination_and_an_array_larger_than_the_arena():
    device = torch.device("cuda")
    staging = PinnedStaging(step_input_bytes(16, 4, 2), device)
    staging.begin_step()
    dst = torch.zeros(4, 8, dtype=torch.int32, device=device)
    part = np.arange(6, dtype=np.int32).reshape(3, 2)
    staging.put(dst[:3, :2], part)  # a graph's block table: rows of a wider static buffer
    big = np.arange(10_000, dtype=np.int64)  # over the arena: pinned on its own, still copied
    got_big = staging.to_device(big)
    staging.end_step()
    torch.cuda.synchronize()
    assert np.array_equal(dst[:3, :2].cpu().numpy(), part) and int(dst[3:].abs().sum()) == 0
    assert np.array_equal(got_big.cpu().numpy(), big)


def test_wrong_dtype_is_refused():
    staging = PinnedStaging(1024, torch.device("cuda"))
    staging.begin_step()
    with pytest.raises(TypeError, match="dtypes and shapes must match"):
        staging.put(torch.zeros(4, dtype=torch.int32, device="cuda"), np.arange(4, dtype=np.int64))


def test_fill_pads_the_rows_past_the_array_while_the_device_is_busy():
    device = torch.device("cuda")
    staging = PinnedStaging(step_input_bytes(64, 8, 4), device)
    slots = torch.zeros(64, dtype=torch.int64, device=device)
    got = []
    for step, n in enumerate((40, 3, 64, 0)):  # a shorter step after a longer one leaves no stale rows
        staging.begin_step()
        torch.cuda._sleep(2_000_000)
        staging.put(slots[:48], np.arange(n, dtype=np.int64)[:48] + 100 * step, fill=-1)
        got.append(slots.clone())
        staging.end_step()
    torch.cuda.synchronize()
    for step, (n, slot_rows) in enumerate(zip((40, 3, 64, 0), got)):
        live = min(n, 48)
        assert slot_rows[:live].tolist() == list(range(100 * step, 100 * step + live))
        assert (slot_rows[live:48] == -1).all() and (slot_rows[48:] == 0).all()
