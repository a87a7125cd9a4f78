"""Programmatic dependent launch (workers/layers/pdl.py): a chain of the decode step's kernels, each
reading what the one before wrote, gives bitwise what it gives without PDL, eagerly and replayed
in a CUDA graph over fresh inputs. A kernel that read before its wait would race and differ.
Needs a Hopper or later GPU (PDL); skips elsewhere, the interpreter included.
"""
import pytest
import torch

if not torch.cuda.is_available() or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("PDL needs an NVIDIA GPU of compute capability 9 or more", allow_module_level=True)

from workers.attention.triton_decode import paged_decode_attention  # noqa: E402
from workers.layers import pdl  # noqa: E402
from workers.layers.skinny_gemm import skinny_gemm  # noqa: E402
from workers.layers.triton_ops import fused_add_rms_norm, silu_and_mul  # noqa: E402

pytestmark = [pytest.mark.gpu]

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, BLOCK = 512, 8, 2, 128, 1024, 16


def _layers(num_layers: int):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda") * shape[-1] ** -0.5).to(torch.bfloat16)

    return [(1 + 0.1 * w(HIDDEN), w(HEADS * HEAD_DIM, HIDDEN), w(HIDDEN, HEADS * HEAD_DIM), 1 + 0.1 * w(HIDDEN),
             w(2 * INTER, HIDDEN), w(HIDDEN, INTER)) for _ in range(num_layers)]


def _chain(x, layers, kv_cache, block_tables, seq_lens):
    """A decoder-like pass: norm, a projection, paged decode attention (split, then merged), a
    projection, norm, gate/up, silu-mul, down; every kernel consumes the previous one's output."""
    residual = torch.zeros_like(x)
    for norm1, wq, wo, norm2, w_gate_up, w_down in layers:
        h, residual = fused_add_rms_norm(x, residual, norm1, 1e-6)
        q = skinny_gemm(h, wq).view(-1, HEADS, HEAD_DIM)
        attn = paged_decode_attention(q, kv_cache, block_tables, seq_lens, HEAD_DIM ** -0.5, num_splits=4)
        h, residual = fused_add_rms_norm(skinny_gemm(attn.flatten(1), wo), residual, norm2, 1e-6)
        x = skinny_gemm(silu_and_mul(skinny_gemm(h, w_gate_up)), w_down)
    return x + residual


@torch.inference_mode()
def test_pdl_chain_is_bitwise_the_plain_chain(monkeypatch):
    layers = _layers(6)
    rows = 3
    kv_cache = (torch.randn(2, 64, BLOCK, KV_HEADS, HEAD_DIM, device="cuda") * 0.5).to(torch.bfloat16)
    block_tables = torch.randperm(64, device="cuda", dtype=torch.int32)[:60].view(rows, 20)
    seq_lens = torch.tensor([300, 17, 320], dtype=torch.int32, device="cuda")
    inputs = [torch.randn(rows, HIDDEN, device="cuda").to(torch.bfloat16) for _ in range(8)]

    monkeypatch.setattr(pdl, "ENABLED", False)
    expected = [_chain(x, layers, kv_cache, block_tables, seq_lens) for x in inputs]
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.use_pdl(inputs[0])
    for x, want in zip(inputs, expected):
        assert torch.equal(_chain(x, layers, kv_cache, block_tables, seq_lens), want), "eager PDL chain"

    static_x = inputs[0].clone()
    _chain(static_x, layers, kv_cache, block_tables, seq_lens)  # warm-up before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _chain(static_x, layers, kv_cache, block_tables, seq_lens)
    for _ in range(3):
        for x, want in zip(inputs, expected):
            static_x.copy_(x)
            graph.replay()
            assert torch.equal(static_out, want), "PDL chain replayed in a CUDA graph"
