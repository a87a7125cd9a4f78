"""A CUDA graph's static inputs as typed views of one device byte buffer: one copy a step.

A graph reads its inputs from fixed addresses, and putting each array there was a copy of its own:
five or six host dispatches a step, and a block table narrower than the static one went in as a
copy plus a strided-copy kernel (torch.profiler, H100 host, s9-call1). Here the arrays are laid
out back to back, written into the step's pinned arena at the same offsets, and copied in one go.
(What it saves is small against the run-to-run noise of a request's host time: a warm prefix hit's
forward-to-replay read 0.18-0.22 ms against 0.22-0.28 before, H100, s9-call3.)

The last field (the block tables) is copied only as far as the step's live rows: rows past them
belong to padding, which reads no context. A live row's entries past its step's widest table are
stale too; kernels read a row's entries only for positions below its seq_len.
"""
import math

import numpy as np
import torch

from workers.pinned_staging import ALIGN, TORCH_DTYPES, PinnedStaging

_NUMPY = {t: n for n, t in TORCH_DTYPES.items()}  # torch dtype -> numpy dtype
MAX_KEPT_SLOTS = 16  # staging slots (arena, start) whose typed views a layout keeps


class PackedInputs:
    def __init__(self, fields: list[tuple[str, torch.dtype, tuple[int, ...]]], buffer: torch.Tensor):
        """fields: (name, dtype, shape) in layout order; buffer: uint8 on the device, at least
        packed_bytes(fields) long. Several layouts may view one buffer: only one graph runs at a time."""
        self.buffer = buffer
        self.layout: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, dtype, shape in fields:
            nbytes = math.prod(shape) * dtype.itemsize
            self.layout[name] = (offset, _NUMPY[dtype], shape)
            self.views[name] = buffer[offset:offset + nbytes].view(dtype).view(shape)
            offset = -(-(offset + nbytes) // ALIGN) * ALIGN
        self.num_bytes = offset
        self._last_offset, last_dtype, last_shape = self.layout[name]  # the field copied by rows
        self._row_bytes = math.prod(last_shape[1:]) * last_dtype.itemsize
        self._host_views: dict[tuple, dict[str, np.ndarray]] = {}  # (staging, arena, start) -> views
        self._copy_dst: dict[int, torch.Tensor] = {}  # live rows -> the buffer's bytes a step copies

    @staticmethod
    def packed_bytes(fields: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
        return sum(-(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN for _, dtype, shape in fields)

    def reset(self, fills: dict[str, int]) -> None:
        """Fill whole views on the device (before a capture: what the warm-up and capture read)."""
        for name, value in fills.items():
            self.views[name].fill_(value)

    def put(self, staging: PinnedStaging, arrays: dict[str, tuple[np.ndarray, int | None]], live_rows: int) -> None:
        """Write each array into the leading part of its field (rows, and columns for 2-D ones) and
        fill the field's remaining rows where a fill is given; then one non-blocking copy up to
        live_rows rows of the last field."""
        region, slot = staging.region_slot(self.num_bytes)
        # the fields' typed views of a slot are made once: making them each step (slice, view,
        # reshape and a tuple of slices a field) was about half of a prefix hit's staging
        key = (staging, *slot) if slot is not None else None
        host_views = self._host_views.get(key) if key is not None else None
        if host_views is None:
            host_views = {name: region[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
                          for name, (start, dtype, shape) in self.layout.items()}
            if key is not None:
                # a slot's start moves with what the step staged first (the index arrays of a
                # reordered decode batch): a few dozen starts an arena are possible, ~1 KB each,
                # and all but a few are rare, so the cache is bounded rather than grown for good
                if len(self._host_views) >= MAX_KEPT_SLOTS:
                    self._host_views.clear()
                self._host_views[key] = host_views
        for name, (array, fill) in arrays.items():
            host = host_views[name]
            n = len(array)
            if (array.dtype != host.dtype or array.ndim != host.ndim or n > len(host)
                    or any(a > h for a, h in zip(array.shape[1:], host.shape[1:]))):
                raise TypeError(f"{name}: a {array.dtype} array of shape {array.shape} does not fit a "
                                f"{host.dtype} field of shape {host.shape}")
            if array.ndim == 1:
                host[:n] = array
            else:
                host[(slice(0, n), *(slice(0, m) for m in array.shape[1:]))] = array
            if fill is not None and n < len(host):  # a full field: no numpy call for nothing
                host[n:] = fill
        dst = self._copy_dst.get(live_rows)
        if dst is None:
            dst = self._copy_dst[live_rows] = self.buffer[:self._last_offset + live_rows * self._row_bytes]
        staging.copy_region(dst, region)
