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
        self._last = name

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
        last_offset, last_dtype, last_shape = self.layout[self._last]
        row_bytes = math.prod(last_shape[1:]) * last_dtype.itemsize
        region = staging.region(self.num_bytes)
        for name, (array, fill) in arrays.items():
            start, dtype, shape = self.layout[name]
            if array.dtype != dtype or array.ndim != len(shape) or any(a > s for a, s in zip(array.shape, shape)):
                raise TypeError(f"{name}: a {array.dtype} array of shape {array.shape} does not fit a "
                                f"{dtype} field of shape {shape}")
            host = region[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
            host[tuple(slice(0, n) for n in array.shape)] = array
            if fill is not None:
                host[len(array):] = fill
        staging.copy_region(self.buffer[:last_offset + live_rows * row_bytes], region)
