"""The skinny GEMM (workers/layers/skinny_gemm.py) against a float32 matmul, and linear()'s choice
between it and cuBLAS.

Bound: each output within one rounding of the model dtype of the float32 product (eps * |ref| plus
eps * the row's largest |ref|, for sums that cancel), the bound cuBLAS meets too, which the test
checks on the same inputs so that the bound is known to be a fair one. Under Triton's CPU
interpreter only float16 runs (it truncates float32 -> bfloat16 instead of rounding).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.gpu.triton_device import triton_device

DEVICE = triton_device()

pytest.importorskip("triton")
from workers.layers import linear as linear_module  # noqa: E402
from workers.layers import skinny_gemm as skinny_module  # noqa: E402
from workers.layers import triton_ops  # noqa: E402
from workers.layers.skinny_gemm import MAX_ROWS, skinny_gemm, skinny_gemm_norm  # noqa: E402

pytestmark = [pytest.mark.gpu]

DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16]
# (N, K): Qwen3-0.6B's qkv and down projections, then sizes that leave partial column and K blocks
SHAPES = [(4096, 1024), (1024, 3072), (1000, 300)] if DEVICE == "cuda" else [(40, 300), (16, 256)]


def _within_one_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    eps = torch.finfo(out.dtype).eps
    tol = eps * ref.abs() + eps * ref.abs().amax(dim=1, keepdim=True)
    assert ((out.float() - ref).abs() <= tol).all(), float(((out.float() - ref).abs() - tol).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
def test_skinny_gemm_matches_a_float32_product(dtype, n, k, m):
    gen = torch.Generator(device=DEVICE).manual_seed(m * 7 + n)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.05).to(dtype)
    wide = torch.randn(m, k + 8, generator=gen, device=DEVICE).to(dtype)
    x = wide[:, :k]  # rows of a wider buffer: stride(0) != K
    ref = x.float() @ weight.float().T
    out = skinny_gemm(x, weight)
    assert out.shape == (m, n) and out.dtype == dtype and torch.isfinite(out).all()
    _within_one_rounding(out, ref)
    if DEVICE == "cuda":
        _within_one_rounding(F.linear(x, weight), ref)  # the bound is one cuBLAS meets as well


def test_linear_takes_the_skinny_gemm_up_to_max_rows_only(monkeypatch):
    calls = []

    def counting(x, weight, **kwargs):
        calls.append(x.shape[0])
        return skinny_gemm(x, weight, **kwargs)

    monkeypatch.setattr(skinny_module, "skinny_gemm", counting)
    weight = torch.randn(64, 256, device=DEVICE).to(torch.float16)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 256, device=DEVICE).to(torch.float16)
        _within_one_rounding(linear_module.linear(x, weight), x.float() @ weight.float().T)
    assert calls == [1, MAX_ROWS], "more rows than MAX_ROWS go to cuBLAS"
    linear_module.linear(torch.randn(2, 256, device=DEVICE), weight.float())
    assert calls == [1, MAX_ROWS], "float32 keeps cuBLAS (tl.dot would round its inputs to tf32)"
    monkeypatch.setattr(linear_module, "SKINNY_GEMM_ENABLED", False)
    linear_module.linear(torch.randn(2, 256, device=DEVICE).to(torch.float16), weight)
    assert calls == [1, MAX_ROWS], "FOLOVLLM_SKINNY_GEMM=0 keeps cuBLAS"


@pytest.mark.skipif(DEVICE != "cuda", reason="the L2 prefetch is a CUDA instruction (PDL launches only)")
@pytest.mark.parametrize("n,k", [(4096, 1024), (1000, 304)])
def test_the_l2_prefetch_leaves_the_product_unchanged(n, k):
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.05).to(torch.bfloat16)
    x = torch.randn(4, k, generator=gen, device=DEVICE).to(torch.bfloat16)
    streamed = skinny_gemm(x, weight, prefetch=False)
    assert torch.equal(skinny_gemm(x, weight, prefetch=True), streamed)
    assert torch.equal(skinny_gemm(x, weight), streamed)


@pytest.mark.skipif(DEVICE != "cuda", reason="the prefetch rule reads the card's L2 size")
def test_only_weights_well_inside_l2_are_prefetched():
    limit = skinny_module._card(0)[0]
    assert limit == torch.cuda.get_device_properties(0).L2_cache_size // skinny_module._PREFETCH_L2_FRACTION
    small = torch.empty(limit // 2 // 1024, 512, dtype=torch.bfloat16, device=DEVICE)  # limit / 2 bytes
    large = torch.empty(limit // 1024 + 1, 512, dtype=torch.bfloat16, device=DEVICE)  # just past the limit
    assert skinny_module._fits_l2(small) and not skinny_module._fits_l2(large)


# The norm before a projection and the SiLU-mul after gate_up, run inside the GEMM
FUSED_SHAPES = [(1024, 1024), (1000, 304)] if DEVICE == "cuda" else [(40, 300), (16, 256)]


def _norm_inputs(m, n, k, dtype, with_residual, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.05).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, generator=gen, device=DEVICE)).to(dtype)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    residual = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype) if with_residual else None
    return x, residual, norm_weight, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", FUSED_SHAPES)
@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("with_residual", [True, False])
def test_the_norm_in_the_gemm_matches_the_two_kernels(dtype, n, k, m, with_residual):
    """The residual sum is bitwise the norm kernel's. The product may differ where the other order
    of the float32 sum of squares moved a normalised activation by an ulp: each output stays within
    one rounding of the float32 product of the norm kernel's activations, and nearly every output
    is bitwise the two kernels' (a kernel that rounded at other points would leave few so)."""
    x, residual, norm_weight, weight = _norm_inputs(m, n, k, dtype, with_residual, seed=m * 5 + n + k)
    if with_residual:
        normed, summed = triton_ops.fused_add_rms_norm(x, residual, norm_weight, 1e-6)
    else:
        normed, summed = triton_ops.rms_norm(x, norm_weight, 1e-6), x
    out, residual_out = skinny_gemm_norm(x, residual, norm_weight, 1e-6, weight)
    assert torch.equal(residual_out, summed)
    if not with_residual:
        assert residual_out is x, "without a residual the stream is x itself, not a copy"
    two_kernels = skinny_gemm(normed, weight)
    _within_one_rounding(out, normed.float() @ weight.float().T)
    equal = (out == two_kernels).float().mean().item()
    assert equal >= 0.9, f"only {equal:.1%} of the outputs equal the two kernels' product"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", FUSED_SHAPES)
@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
def test_silu_mul_in_the_gemm_gives_silu_and_mul_of_its_product(dtype, n, k, m):
    """gate_up [2n, k]: the kernel's n outputs are silu_and_mul of its own 2n-column product, bitwise."""
    x, residual, norm_weight, gate_up = _norm_inputs(m, 2 * n, k, dtype, True, seed=m + n + k)
    act, _ = skinny_gemm_norm(x, residual, norm_weight, 1e-6, gate_up, silu_mul=True)
    product, _ = skinny_gemm_norm(x, residual, norm_weight, 1e-6, gate_up)
    assert act.shape == (m, n)
    assert torch.equal(act, triton_ops.silu_and_mul(product))


@torch.inference_mode()
def test_the_decoder_runs_its_norms_and_silu_mul_inside_the_gemms_at_few_rows(tiny_model_dir, monkeypatch):
    """A step of <= MAX_ROWS tokens: the qkv and gate_up GEMMs take the norms (gate_up also SiLU-mul),
    and the hidden states are the separate kernels', up to the rare ulp of the sum of squares' order."""
    from tests.conftest import PagedSeqs, allocate_kv_caches
    from workers.config import ModelConfig
    from workers.model_configs import resolve_model
    from workers.weight_loader import load_model

    hf_config, _ = resolve_model(str(tiny_model_dir))
    model = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float16"), hf_config, DEVICE, torch.float16)
    calls = []
    fused = skinny_module.skinny_gemm_norm
    monkeypatch.setattr(skinny_module, "skinny_gemm_norm",
                        lambda *args, **kwargs: calls.append(kwargs.get("silu_mul", False)) or fused(*args, **kwargs))

    def forward(rows_per_seq):
        paged = PagedSeqs(block_size=4, num_blocks=64)
        kv_caches = allocate_kv_caches(hf_config, 64, 4, torch.float16, DEVICE)
        ids, positions, metadata = paged.step({s: [(7 * s + j) % 5000 + 3 for j in range(n)]
                                               for s, n in enumerate(rows_per_seq)}, device=DEVICE)
        return model(ids, positions, kv_caches, metadata).float()

    layers = hf_config.num_hidden_layers
    with_fusion = forward([5, 3, 1])
    assert sorted(calls) == [False] * layers + [True] * layers, "qkv's norm, and gate_up's norm and SiLU-mul"
    monkeypatch.setattr(linear_module, "FUSE_INTO_GEMM", False)
    calls.clear()
    separate = forward([5, 3, 1])
    assert not calls, "FUSE_INTO_GEMM off runs the norm and SiLU-mul kernels"
    scale = separate.abs().amax(dim=1, keepdim=True)
    assert ((with_fusion - separate).abs() <= 4 * torch.finfo(torch.float16).eps * scale).all()
    assert (with_fusion == separate).float().mean() >= 0.9
    monkeypatch.setattr(linear_module, "FUSE_INTO_GEMM", True)
    forward([MAX_ROWS, 1])
    assert not calls, "more than MAX_ROWS rows keep cuBLAS and the separate kernels"
