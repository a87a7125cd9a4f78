"""Programmatic dependent launch (workers/layers/pdl.py): a chain of a forward pass's kernels, each
reading what the one before wrote, gives bitwise what it gives without PDL, eagerly and replayed
in a CUDA graph over fresh inputs. A kernel that read before its wait what the kernel before it
writes would race and differ: the chain writes each step's K/V into the cache with the q/k kernel
right before the attention kernel that reads the cache, and changes the step's
positions, slots and context lengths from one input to the next.
Needs a Hopper or later GPU (PDL); skips elsewhere, the interpreter included.
"""
import pytest
import torch

if not torch.cuda.is_available() or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("PDL needs an NVIDIA GPU of compute capability 9 or more", allow_module_level=True)

from workers.attention.triton_decode import paged_decode_attention  # noqa: E402
from workers.attention.triton_prefill import paged_prefill_attention  # noqa: E402
from workers.layers import pdl  # noqa: E402
from workers.layers.rotary import RotaryEmbedding  # noqa: E402
from workers.layers.skinny_gemm import skinny_gemm  # noqa: E402
from workers.layers.triton_ops import fused_add_rms_norm, qk_norm_rope, silu_and_mul  # noqa: E402

pytestmark = [pytest.mark.gpu]

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, BLOCK, NUM_BLOCKS = 512, 8, 2, 128, 1024, 16, 96
QKV = (HEADS + 2 * KV_HEADS) * HEAD_DIM


def _layers(num_layers: int):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda") * shape[-1] ** -0.5).to(torch.bfloat16)

    return [dict(norm1=1 + 0.1 * w(HIDDEN), qkv=w(QKV, HIDDEN), q_norm=1 + 0.1 * w(HEAD_DIM),
                 k_norm=1 + 0.1 * w(HEAD_DIM), o=w(HIDDEN, HEADS * HEAD_DIM), norm2=1 + 0.1 * w(HIDDEN),
                 gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER)) for _ in range(num_layers)]


def _step(query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor):
    """A step's inputs on the device: positions, slots, seq_lens, query_start_loc."""
    positions, slots = [], []
    for row, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        for pos in range(ctx, ctx + q_len):
            positions.append(pos)
            slots.append(int(block_tables[row, pos // BLOCK]) * BLOCK + pos % BLOCK)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    as_dev = lambda v, dtype: torch.tensor(v, dtype=dtype, device="cuda")  # noqa: E731
    return dict(positions=as_dev(positions, torch.long), slots=as_dev(slots, torch.long),
                seq_lens=as_dev([c + q for c, q in zip(context_lens, query_lens)], torch.int32),
                query_start_loc=as_dev(starts, torch.int32))


def _chain(x, layers, kv_caches, block_tables, step, cos_sin, decode: bool):
    """A decoder-like pass: norm, qkv, q/k norm + RoPE writing K/V into the layer's cache, paged
    attention (split, then merged), o, norm, gate/up, silu-mul, down."""
    residual = torch.zeros_like(x)
    for p, kv_cache in zip(layers, kv_caches):
        h, residual = fused_add_rms_norm(x, residual, p["norm1"], 1e-6)
        q, k, v = skinny_gemm(h, p["qkv"]).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        v = v.unflatten(-1, (KV_HEADS, HEAD_DIM))
        q, _ = qk_norm_rope(q.unflatten(-1, (HEADS, HEAD_DIM)), k.unflatten(-1, (KV_HEADS, HEAD_DIM)),
                            p["q_norm"], p["k_norm"], 1e-6, cos_sin, step["positions"],
                            kv_write=(v, kv_cache, step["slots"]))
        if decode:
            attn = paged_decode_attention(q, kv_cache, block_tables, step["seq_lens"], HEAD_DIM ** -0.5,
                                          num_splits=4)
        else:
            attn = paged_prefill_attention(q, kv_cache, block_tables, step["seq_lens"], step["query_start_loc"],
                                           HEAD_DIM ** -0.5, num_splits=3, split_programs=24, block_m=64,
                                           num_warps=4)
        h, residual = fused_add_rms_norm(skinny_gemm(attn.flatten(1), p["o"]), residual, p["norm2"], 1e-6)
        x = skinny_gemm(silu_and_mul(skinny_gemm(h, p["gate_up"])), p["down"])
    return x + residual


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@torch.inference_mode()
def test_pdl_chain_is_bitwise_the_plain_chain(monkeypatch, decode):
    layers = _layers(4)
    query_lens = [1, 1, 1] if decode else [4, 1, 9]
    contexts = [[299, 16, 319], [40, 200, 7], [480, 3, 64], [128, 128, 300]]  # each fits its 32-block table
    block_tables = torch.randperm(NUM_BLOCKS, device="cuda", dtype=torch.int32)[:3 * 32].view(3, 32)
    steps = [_step(query_lens, c, block_tables) for c in contexts]
    num_tokens = sum(query_lens)
    inputs = [torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16) for _ in steps]
    cos_sin = RotaryEmbedding(HEAD_DIM, 1024, 1e6).cos_sin_cache.cuda()
    caches0 = [(torch.randn(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, device="cuda") * 0.5).to(torch.bfloat16)
               for _ in layers]
    caches = [c.clone() for c in caches0]

    def run(x, step):
        for c, c0 in zip(caches, caches0):
            c.copy_(c0)
        out = _chain(x, layers, caches, block_tables, step, cos_sin, decode)
        return out, [c.clone() for c in caches]

    monkeypatch.setattr(pdl, "ENABLED", False)
    expected = [run(x, s) for x, s in zip(inputs, steps)]
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.use_pdl(inputs[0])
    for x, s, (want, want_caches) in zip(inputs, steps, expected):
        got, got_caches = run(x, s)
        assert torch.equal(got, want), "eager PDL chain"
        assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches)), "eager PDL chain's KV writes"

    static_x, static_step = inputs[0].clone(), {k: v.clone() for k, v in steps[0].items()}
    run(static_x, static_step)  # warm-up before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _chain(static_x, layers, caches, block_tables, static_step, cos_sin, decode)
    for _ in range(3):
        for x, s, (want, want_caches) in zip(inputs, steps, expected):
            static_x.copy_(x)
            for k, v in s.items():
                static_step[k].copy_(v)
            for c, c0 in zip(caches, caches0):
                c.copy_(c0)
            graph.replay()
            assert torch.equal(static_out, want), "PDL chain replayed in a CUDA graph"
            assert all(torch.equal(a, b) for a, b in zip(caches, want_caches)), "replayed chain's KV writes"
