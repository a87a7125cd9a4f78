"""Programmatic dependent launch (PDL; Hopper and later) for the Triton kernels of a forward pass.

A decode step of a small model is ~300 kernels of a few microseconds each, and each pays for its
launch and for its first loads. Launched with PDL, a kernel may start while the one before it in
the stream is still running: it waits (gdc_wait) before reading anything an earlier kernel wrote,
and lets the next kernel launch (gdc_launch_dependents) only once it is past that wait, so at most
one kernel runs ahead. What a kernel does before its wait must not read what the kernel right
before it writes; anything older is complete by then, since that kernel waited too. So the work
before the wait is the step's inputs and the weights: the skinny GEMM can prefetch its weight
slice into L2 (off by default: skinny_gemm.PREFETCH_BY_SIZE), the q/k kernel reads positions,
slots and its cos/sin rows, the decode attention kernel its sequence order and context length,
the prefill kernel its tile count. Dependent input loads moved there took a 4-row decode graph
of Qwen3-0.6B from 1.235 to 1.19 ms (H100, s10-call3).

A GEMM followed by another GEMM (gate_up with its SiLU-mul epilogue, then down) releases only
after its K loop instead (pdl_wait, then pdl_release later): the next GEMM's programs would
otherwise hold SMs and stream their weight beside it for its whole run.

A kernel that does not trigger (torch's, cuBLAS's, NCCL's) lets the next one launch only when it
completes, as without PDL; the waits keep every order. FOLOVLLM_PDL=0 turns it off (to compare).
"""
import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("FOLOVLLM_PDL", "1") != "0"


@functools.cache
def hopper_or_later(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9 or more (PDL; staged_gemm.py's kernel too)."""
    # NVIDIA only: a ROCm build reports its own capability numbers through the same call
    return torch.version.cuda is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL (never on the CPU, under the interpreter)."""
    return ENABLED and t.is_cuda and hopper_or_later(t.device.index if t.device.index is not None
                                                     else torch.cuda.current_device())


def launch_options(pdl: bool) -> dict:
    """The launch keyword for a kernel given USE_PDL=pdl (none at all off CUDA: the interpreter)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait for the kernel before (its writes visible), then let the next one launch."""
    pdl_wait(USE_PDL)
    pdl_release(USE_PDL)


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the kernel before: its writes are visible after this."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the next kernel launch (once every program of this one has called it or exited)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptr, num_bytes):
    """One bulk prefetch of num_bytes (a multiple of 16) from ptr (16-byte aligned) into L2."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // dummy $0", "=r,l,r",
                              [ptr, num_bytes], dtype=tl.int32, is_pure=False, pack=1)
