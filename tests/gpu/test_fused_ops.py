"""Fused Triton ops (workers/layers/triton_ops.py) against the layers' torch path, the reference.

Skipped without CUDA. With TRITON_INTERPRET=1 (and triton installed) the float32/float16 cases run
on the CPU through Triton's interpreter (~1 min). bfloat16 is CUDA-only: the interpreter casts
float32 -> bfloat16 by truncation, not round-to-nearest-even as the GPU and torch do.

Bounds. The kernels round to the model dtype at the same points as the torch path, so what can
differ is the float32 sum of squares (another reduction order) and rsqrt: ~1e-7 relative. That
flips a rounded intermediate by one ulp now and then, which the following multiply carries to the
output: so each element is within 2 eps of the reference (eps = finfo(dtype).eps: 2^-7 bf16,
2^-10 fp16), relative to |ref| for norms and SiLU-mul and to the largest |ref| of its head for
RoPE (its outputs are differences, so an element may cancel to ~0 while its error does not).
float32 gets 1e-6 on the same scales. And for half types at most 1% of elements may differ at
all: a kernel that rounded at other points (e.g. weight times the float32 activations) differs
in ~20-50% of them.
"""
import contextlib

import pytest
import torch

from tests.gpu.triton_device import triton_device

DEVICE = triton_device()

pytest.importorskip("triton")
from workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul, rmsnorm  # noqa: E402
from workers.layers import triton_ops  # noqa: E402

pytestmark = [pytest.mark.gpu]

DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float16, torch.float32]
TOKENS = [1, 7, 256, 4099] if DEVICE == "cuda" else [1, 7, 256]
HEADS = [(16, 8), (32, 8)]  # (Hq, Hkv), head_dim 128: Qwen3-0.6B/1.7B and 4B/8B
HEAD_DIM = 128
MAX_POSITION = 40960
EPS = 1e-6


@contextlib.contextmanager
def fused_ops(enabled: bool):
    saved = rmsnorm.FUSED_OPS_ENABLED
    rmsnorm.FUSED_OPS_ENABLED = enabled
    try:
        yield
    finally:
        rmsnorm.FUSED_OPS_ENABLED = saved


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_within_rounding(out, ref, scale=None):
    """|out - ref| <= tol * scale (default |ref|) elementwise; see the module docstring."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs() if scale is None else scale
    if ref.dtype == torch.float32:
        tol = 1e-6
    else:
        tol = 2 * torch.finfo(ref.dtype).eps
        mismatch = (out != ref).float().mean().item() if out.numel() else 0.0
        assert mismatch <= 0.01, f"{mismatch:.2%} of elements differ: not the torch path's rounding order"
    worst = (diff - tol * scale).max().item() if out.numel() else 0.0
    assert worst <= 0, f"max |diff| {diff.max().item():.3g} beyond {tol:.1e} x scale"


def norm_weight(dim, dtype):
    # Qwen3 checkpoints' norm weights are far from 1; spread them, signs included
    return (torch.randn(dim, device=DEVICE) * 0.8 + 1.0).to(dtype)


def make_norm(dim, dtype):
    norm = RMSNorm(dim, EPS).to(device=DEVICE, dtype=dtype)
    norm.weight.data.copy_(norm_weight(dim, dtype))
    return norm


# ---------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [1024, 4096])
@torch.inference_mode()
def test_fused_add_rms_norm(dtype, num_tokens, hidden):
    norm = make_norm(hidden, dtype)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE) * 3
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    x_before, residual_before = x.clone(), residual.clone()
    with fused_ops(False):
        ref, ref_residual = norm.forward_with_residual(x, residual)
    out, new_residual = poisoned(x.shape, dtype), poisoned(x.shape, dtype)
    got = triton_ops.fused_add_rms_norm(x, residual, norm.weight, EPS, out=out, residual_out=new_residual)
    assert got[0] is out and got[1] is new_residual
    assert torch.equal(new_residual, ref_residual), "x + residual must round exactly as torch's add"
    assert_within_rounding(out, ref)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs changed"
    # the module dispatches to the same kernel
    with fused_ops(True):
        via_module = norm.forward_with_residual(x, residual)
    assert torch.equal(via_module[0], out) and torch.equal(via_module[1], new_residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [1024, 4096])
@torch.inference_mode()
def test_rms_norm(dtype, num_tokens, hidden):
    norm = make_norm(hidden, dtype)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE) * 3
    with fused_ops(False):
        ref = norm(x)
    out = poisoned(x.shape, dtype)
    assert triton_ops.rms_norm(x, norm.weight, EPS, out=out) is out
    assert_within_rounding(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@torch.inference_mode()
def test_rms_norm_strided_and_odd_shapes(dtype):
    """Rows of a wider buffer, a 3-D input, a width that is not a power of two, and no rows."""
    for shape, hidden in [((5,), 1000), ((3, 4), 128), ((0,), 1024)]:
        norm = make_norm(hidden, dtype)
        wide = torch.randn(*shape, hidden + 24, dtype=dtype, device=DEVICE)
        x, residual = wide[..., 8:hidden + 8], wide[..., :hidden]  # strided views
        with fused_ops(False):
            ref, ref_residual = norm.forward_with_residual(x, residual)
            ref_plain = norm(x)
        with fused_ops(True):
            out, new_residual = norm.forward_with_residual(x, residual)
            plain = norm(x)
        assert torch.equal(new_residual, ref_residual)
        assert_within_rounding(out, ref)
        assert_within_rounding(plain, ref_plain)


# ------------------------------------------------------------------------------ q/k norm + RoPE

def qk_from_qkv(num_tokens, num_heads, num_kv_heads, dtype):
    """q [T, Hq, D] and k [T, Hkv, D] as the attention layer makes them: views of a split qkv."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM, dtype=dtype, device=DEVICE) * 2
    q, k, _ = qkv.split([num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], dim=-1)
    q, k = q.unflatten(-1, (num_heads, HEAD_DIM)), k.unflatten(-1, (num_kv_heads, HEAD_DIM))
    if num_tokens > 1:  # (one token: unflatten re-strides the size-1 dim)
        assert q.stride(0) == k.stride(0) == qkv.stride(0) and not q.is_contiguous()
    return q, k


@pytest.fixture(scope="module")
def rope():
    return RotaryEmbedding(HEAD_DIM, MAX_POSITION, 1e6).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("heads", HEADS)
@torch.inference_mode()
def test_qk_norm_rope(rope, dtype, num_tokens, heads):
    num_heads, num_kv_heads = heads
    q, k = qk_from_qkv(num_tokens, num_heads, num_kv_heads, dtype)
    q_norm, k_norm = make_norm(HEAD_DIM, dtype), make_norm(HEAD_DIM, dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    positions[0] = MAX_POSITION - 1  # the last row of the table
    with fused_ops(False):
        ref_q, ref_k = rope.norm_and_rotate(positions, q, k, q_norm, k_norm)
    q_out, k_out = poisoned(q.shape, dtype), poisoned(k.shape, dtype)
    got = triton_ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, EPS, rope.cos_sin_cache, positions,
                                  q_out=q_out, k_out=k_out)
    assert got[0] is q_out and got[1] is k_out
    for out, ref in ((q_out, ref_q), (k_out, ref_k)):
        assert_within_rounding(out, ref, scale=ref.float().abs().amax(-1, keepdim=True))
    with fused_ops(True):
        via_module = rope.norm_and_rotate(positions, q, k, q_norm, k_norm)
    assert torch.equal(via_module[0], q_out) and torch.equal(via_module[1], k_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@torch.inference_mode()
def test_qk_norm_rope_writes_the_cache_as_reshape_and_cache_would(rope, dtype):
    """kv_write: the same q, and k/v in the cache bit for bit where the two kernels put them;
    slot -1 (graph padding) writes nothing."""
    from workers.attention.triton_common import reshape_and_cache

    num_tokens, num_heads, num_kv_heads, block_size, num_blocks = 37, 16, 8, 16, 8
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM, dtype=dtype, device=DEVICE)
    q, k, v = (x.unflatten(-1, (-1, HEAD_DIM)) for x in qkv.split(
        [num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], dim=-1))
    q_norm, k_norm = make_norm(HEAD_DIM, dtype), make_norm(HEAD_DIM, dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::5] = -1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, HEAD_DIM, dtype=dtype, device=DEVICE)
    expected = cache.clone()
    with fused_ops(True):
        ref_q, ref_k = rope.norm_and_rotate(positions, q, k, q_norm, k_norm)
        reshape_and_cache(ref_k, v, expected, slots)
        got_q, got_k = rope.norm_and_rotate(positions, q, k, q_norm, k_norm, kv_write=(v, cache, slots))
    assert got_k is None and torch.equal(got_q, ref_q)
    assert torch.equal(cache, expected)


@torch.inference_mode()
def test_qk_norm_rope_small_head_dim_and_no_tokens():
    """The tiny test model's head_dim 16 (half 8), 3 heads (padded to 4), contiguous inputs; T = 0."""
    rope = RotaryEmbedding(16, 512, 1e6).to(DEVICE)
    q_norm, k_norm = make_norm(16, torch.float32), make_norm(16, torch.float32)
    for num_tokens in (0, 9):
        q = torch.randn(num_tokens, 3, 16, device=DEVICE)
        k = torch.randn(num_tokens, 1, 16, device=DEVICE)
        positions = torch.randint(0, 512, (num_tokens,), device=DEVICE)
        with fused_ops(False):
            ref_q, ref_k = rope.norm_and_rotate(positions, q, k, q_norm, k_norm)
        got_q, got_k = triton_ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, EPS, rope.cos_sin_cache,
                                               positions)
        assert got_q.shape == q.shape and got_k.shape == k.shape
        assert_within_rounding(got_q, ref_q, scale=ref_q.abs().amax(-1, keepdim=True))
        assert_within_rounding(got_k, ref_k, scale=ref_k.abs().amax(-1, keepdim=True))


# ------------------------------------------------------------------------------------ SiLU-mul

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("intermediate", [3072, 1000])
@torch.inference_mode()
def test_silu_and_mul(dtype, num_tokens, intermediate):
    wide = torch.randn(num_tokens, 2 * intermediate + 16, dtype=dtype, device=DEVICE) * 3
    x = wide[:, 16:] if num_tokens % 2 else wide[:, :2 * intermediate].contiguous()  # strided rows too
    with fused_ops(False):
        ref = SiluAndMul()(x)
    out = poisoned(ref.shape, dtype)
    assert triton_ops.silu_and_mul(x, out=out) is out
    assert_within_rounding(out, ref)
    with fused_ops(True):
        assert torch.equal(SiluAndMul()(x), out)


@torch.inference_mode()
def test_no_tokens():
    x = torch.randn(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert triton_ops.rms_norm(x, w, EPS).shape == (0, 64)
    normed, residual = triton_ops.fused_add_rms_norm(x, x, w, EPS)
    assert normed.shape == residual.shape == (0, 64)
    assert triton_ops.silu_and_mul(x).shape == (0, 32)


# ------------------------------------------------------------------------------- CUDA graphs

@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@torch.inference_mode()
def test_cuda_graph_replay(rope):
    """All three ops captured once, replayed on fresh inputs: same results as eager calls."""
    dtype, num_tokens = torch.bfloat16, 8
    norm, q_norm, k_norm = make_norm(1024, dtype), make_norm(HEAD_DIM, dtype), make_norm(HEAD_DIM, dtype)
    x = torch.randn(num_tokens, 1024, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    qkv = torch.randn(num_tokens, 32 * HEAD_DIM, dtype=dtype, device=DEVICE)
    gate_up = torch.randn(num_tokens, 6144, dtype=dtype, device=DEVICE)
    positions = torch.zeros(num_tokens, dtype=torch.long, device=DEVICE)

    def step():
        q, k, _ = qkv.split([16 * HEAD_DIM, 8 * HEAD_DIM, 8 * HEAD_DIM], dim=-1)
        q, k = q.unflatten(-1, (16, HEAD_DIM)), k.unflatten(-1, (8, HEAD_DIM))
        with fused_ops(True):
            return (*norm.forward_with_residual(x, residual),
                    *rope.norm_and_rotate(positions, q, k, q_norm, k_norm), SiluAndMul()(gate_up))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(3):
        for t in (x, residual, qkv, gate_up):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(), strict=True):
            assert torch.equal(got, want)


# ------------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.inference_mode()
def test_tiny_model_matches_torch_path(tiny_model_dir, backend):
    """float32 tiny Qwen3: logits of a prefill and decode steps with fused ops vs without, 1e-5.
    With the Triton backend the fused q/k kernel also writes K/V into the cache."""
    from tests.conftest import PagedSeqs, allocate_kv_caches
    from workers.attention import get_attention_backend
    from workers.config import ModelConfig
    from workers.model_configs import resolve_model
    from workers.weight_loader import load_model

    hf_config, _ = resolve_model(str(tiny_model_dir))
    model = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32"), hf_config, DEVICE,
                       torch.float32, attn_backend=get_attention_backend(backend, DEVICE))
    prompts = {0: list(range(100, 117)), 1: [5], 2: list(range(2000, 2040))}

    def run(enabled: bool) -> list[torch.Tensor]:
        paged = PagedSeqs(16, num_blocks=32)
        kv_caches = allocate_kv_caches(hf_config, 32, 16, device=DEVICE)
        steps = [prompts] + [{s: [300 + 7 * i + s] for s in prompts} for i in range(3)]
        logits = []
        with fused_ops(enabled):
            for chunks in steps:
                input_ids, positions, metadata = paged.step(chunks, device=DEVICE)
                logits.append(model.compute_logits(model(input_ids, positions, kv_caches, metadata)))
        return logits

    for fused, plain in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="counts CUDA kernels")
@torch.inference_mode()
def test_decode_kernels_per_layer():
    """CUDA kernels a Qwen3-0.6B-shaped decoder layer launches for one decode token (eager)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import Qwen3Config

    from tests.conftest import PagedSeqs, allocate_kv_caches
    from workers.config import ModelConfig
    from workers.model_configs import BUILTIN_CONFIGS
    from workers.weight_loader import load_model

    def kernels(num_layers: int, enabled: bool) -> int:
        hf_config = Qwen3Config(**{**BUILTIN_CONFIGS["Qwen/Qwen3-0.6B"], "num_hidden_layers": num_layers})
        model = load_model(ModelConfig(load_format="dummy"), hf_config, DEVICE, torch.bfloat16)
        paged = PagedSeqs(16, num_blocks=64)
        kv_caches = allocate_kv_caches(hf_config, 64, 16, dtype=torch.bfloat16, device=DEVICE)
        with fused_ops(enabled):
            for tokens in ([1] * 100, [2]):  # prefill, then the decode step that is counted
                args = paged.step({0: tokens}, device=DEVICE)
                model(*args[:2], kv_caches, args[2])  # warm-up: compiles
            args = paged.step({0: [3]}, device=DEVICE)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(*args[:2], kv_caches, args[2])
                torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)

    per_layer = {enabled: (kernels(4, enabled) - kernels(2, enabled)) / 2 for enabled in (False, True)}
    print(f"CUDA kernels per decoder layer: torch path {per_layer[False]:g}, fused {per_layer[True]:g}")
    assert per_layer[True] <= 16 < per_layer[False]
