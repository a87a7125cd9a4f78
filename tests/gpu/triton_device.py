"""Where Triton kernel tests run: CUDA, or the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
import os

import pytest
import torch

def triton_device() -> str:
    """"cuda", or "cpu" under the interpreter; otherwise skips the calling module (call at import)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs CUDA", allow_module_level=True)
