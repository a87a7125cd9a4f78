"""A step's host-to-device input copies through pinned memory allocated once.

A copy from pageable memory waits for the device; one from pinned memory does not. Pinning each
array as it went (Tensor.pin_memory()) cost ~19 us a copy on an H100 host, nine copies a step:
~0.17 ms of a warm prefix hit's time to first token (s5 profile). Here a step's arrays are
written into one pinned arena and copied from there.

Off CUDA the arenas are plain memory and each copy completes at once (the CPU engine and the
Triton interpreter tests take the same path).

Arenas take turns, one a step (two by default). A step rewrites its arena only once the copies
that last read it have run (an event recorded after them): with two steps in flight that step
was collected before this one was prepared, so the wait is normally already over. A multi-step
launch (SchedulerOutput.decode_steps) queues k passes at once, so its runner keeps 2k arenas
(16 at most): fewer would hold the launch until the device caught up.
"""
import numpy as np
import torch

ALIGN = 64  # bytes: every array starts aligned for its dtype's view


class PinnedStaging:
    def __init__(self, num_bytes: int, device: torch.device, num_arenas: int = 2):
        self.num_bytes = num_bytes
        self.device = device
        self._pinned = device.type == "cuda"
        self._arenas = [torch.empty(num_bytes, dtype=torch.uint8, pin_memory=self._pinned)
                        for _ in range(num_arenas)]
        # numpy views of the arenas: staging an array is numpy slicing and one torch.from_numpy.
        # A warm prefix hit's seven puts took 0.12 ms this way, its padding included, against
        # 0.19 ms when each sliced and viewed the torch arena (H100 host, s6-call3 vs s6-call2)
        self._arena_arrays = [arena.numpy() for arena in self._arenas]
        self._events: list[torch.cuda.Event | None] = [None] * num_arenas
        self._current = 0
        self._offset = 0

    def begin_step(self) -> None:
        """Switch to the next arena, once the copies that last read it have run."""
        self._current = (self._current + 1) % len(self._arenas)
        event = self._events[self._current]
        if event is not None:
            event.synchronize()
        self._offset = 0

    def end_step(self) -> None:
        """Mark the arena's copies: call after the step's last put, on the stream that ran them."""
        if not self._pinned:
            return
        event = self._events[self._current] or torch.cuda.Event()
        event.record()
        self._events[self._current] = event

    def put(self, dst: torch.Tensor, array: np.ndarray, fill: int | None = None) -> None:
        """dst.copy_(array) without waiting for the device; dst has array's shape and dtype.

        With fill, dst may have more rows than array: they get fill, in the same copy (a CUDA
        graph's padding, which would otherwise take a fill kernel launch of its own)."""
        rows = dst.shape[0] if fill is not None and dst.dim() > 0 else None
        shape = (rows, *array.shape[1:]) if rows is not None else array.shape
        if (TORCH_DTYPES.get(array.dtype) is not dst.dtype or tuple(dst.shape) != shape
                or (rows is not None and rows < len(array))):
            raise TypeError(f"staging a {array.dtype} array of shape {array.shape} into a {dst.dtype} "
                            f"tensor of shape {tuple(dst.shape)}: dtypes and shapes must match")
        region = self.region(dst.numel() * array.itemsize)
        staged = region.view(array.dtype).reshape(shape)
        if rows is None:
            staged[...] = array
        else:
            staged[:len(array)] = array
            staged[len(array):] = fill
        self._send(dst, staged, own_memory=region.base is None)

    def region(self, num_bytes: int) -> np.ndarray:
        """num_bytes of this step's arena (uint8, ALIGN-aligned) for the caller to write, then
        copy_region; past the arena's size, host memory of its own (pinned at the copy)."""
        start = -(-self._offset // ALIGN) * ALIGN
        if start + num_bytes > self.num_bytes:
            return np.empty(num_bytes, dtype=np.uint8)
        self._offset = start + num_bytes
        return self._arena_arrays[self._current][start:start + num_bytes]

    def region_slot(self, num_bytes: int) -> tuple[np.ndarray, tuple[int, int] | None]:
        """region(num_bytes) and where it lies, (arena, start), or None for memory of its own: a
        caller that writes the same layout every step can keep its typed views of each slot."""
        region = self.region(num_bytes)
        return region, (None if region.base is None else (self._current, self._offset - num_bytes))

    def copy_region(self, dst: torch.Tensor, region: np.ndarray) -> None:
        """dst (uint8, contiguous) <- region's first len(dst) bytes, without waiting for the device."""
        self._send(dst, region[:dst.numel()], own_memory=region.base is None)

    def _send(self, dst: torch.Tensor, host: np.ndarray, own_memory: bool) -> None:
        """dst.copy_(host) without waiting; host memory of its own (not a view of an arena, which
        region() gives past the arena's size) is pinned first."""
        tensor = torch.from_numpy(host)
        dst.copy_(tensor.pin_memory() if own_memory and self._pinned else tensor, non_blocking=True)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        out = torch.empty(array.shape, dtype=TORCH_DTYPES[array.dtype], device=self.device)
        self.put(out, array)
        return out


TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                np.dtype(np.float32): torch.float32}


def step_input_bytes(max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> int:
    """An arena that holds every array of the largest step: three int64 per token (ids, positions,
    slots), the int32 block tables, sequence lengths and query starts, int64 logits indices."""
    arrays = [8 * max_tokens] * 3 + [4 * max_seqs * max_blocks_per_seq, 4 * max_seqs, 4 * (max_seqs + 1),
                                     8 * max_seqs]
    return sum(-(-n // ALIGN) * ALIGN for n in arrays) + ALIGN


class TokenBuffers:
    """Host buffers that a step's sampled tokens are copied back into, pinned on CUDA, reused.

    Pinning a fresh one every step cost ~19 us on an H100 host. A buffer comes back (give_back)
    only once its tokens have been read on the host, so the copy into it has completed; it is then
    handed to a step launched after that, whose copy is queued after the read. No copy ever writes
    a buffer whose tokens are still to be read.
    """

    def __init__(self, num_tokens: int, pinned: bool):
        self.num_tokens = num_tokens  # the most tokens a step samples (max_num_seqs)
        self.pinned = pinned
        self._free: list[torch.Tensor] = []

    def take(self, num_tokens: int) -> torch.Tensor:
        """An int64 buffer of at least num_tokens elements, no other step's until given back."""
        if num_tokens > self.num_tokens:
            return torch.empty(num_tokens, dtype=torch.int64, pin_memory=self.pinned)
        return self._free.pop() if self._free else torch.empty(self.num_tokens, dtype=torch.int64,
                                                               pin_memory=self.pinned)

    def give_back(self, buffer: torch.Tensor) -> None:
        """After the tokens copied into buffer were read."""
        if len(buffer) == self.num_tokens:
            self._free.append(buffer)
