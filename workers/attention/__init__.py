"""Attention backend registry. Backends are imported lazily, so a missing or CUDA-only one costs nothing.

Contract for a registered module: it defines the named class, constructed as cls(device=device),
implementing workers.attention.base.AttentionBackend.
"""
import importlib
import importlib.util

import torch

from workers.attention.base import AttentionBackend, AttentionMetadata

_BACKENDS = {
    "torch": ("workers.attention.torch_ref", "TorchRefBackend"),
    "triton": ("workers.attention.triton_backend", "TritonBackend"),
}


def _available(name: str) -> bool:
    module = _BACKENDS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def get_attention_backend(name: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """"auto" picks triton on CUDA when workers/attention/triton_backend.py exists, else the torch reference."""
    if name == "auto":
        on_cuda = torch.device(device or "cpu").type == "cuda"
        if on_cuda and _available("triton"):
            try:
                return _create("triton", device)
            except ImportError:  # e.g. the triton package itself is missing: the reference still works
                pass
        name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)} or 'auto'")
    if not _available(name):
        raise ValueError(f"attention backend {name!r} is not installed in this checkout")
    return _create(name, device)


def _create(name: str, device) -> AttentionBackend:
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(device=device)


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
