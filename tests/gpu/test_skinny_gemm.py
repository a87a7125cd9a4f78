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
from workers.layers.skinny_gemm import MAX_ROWS, skinny_gemm, skinny_gemm_silu_mul  # noqa: E402

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
def test_the_l2_prefetch_leaves_the_product_unchanged(n, k, monkeypatch):
    monkeypatch.setattr(skinny_module, "STAGED", False)  # the default takes this kernel, not staged_gemm.py
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.05).to(torch.bfloat16)
    x = torch.randn(4, k, generator=gen, device=DEVICE).to(torch.bfloat16)
    streamed = skinny_gemm(x, weight, prefetch=False)
    assert torch.equal(skinny_gemm(x, weight, prefetch=True), streamed)
    assert torch.equal(skinny_gemm(x, weight), streamed)


@pytest.mark.skipif(DEVICE != "cuda", reason="the prefetch rule reads the card's L2 size")
def test_the_size_rule_takes_only_weights_well_inside_l2():
    """The rule FOLOVLLM_GEMM_PREFETCH=1 applies (the prefetch is off by default)."""
    limit = skinny_module._card(0)[0]
    assert limit == torch.cuda.get_device_properties(0).L2_cache_size // skinny_module._PREFETCH_L2_FRACTION
    small = torch.empty(limit // 2 // 1024, 512, dtype=torch.bfloat16, device=DEVICE)  # limit / 2 bytes
    large = torch.empty(limit // 1024 + 1, 512, dtype=torch.bfloat16, device=DEVICE)  # just past the limit
    assert skinny_module._fits_l2(small) and not skinny_module._fits_l2(large)


# SiLU-mul after gate_up, in the GEMM's epilogue: (N, K) of the gate (and the up) half
SILU_SHAPES = [(3072, 1024), (1000, 304)] if DEVICE == "cuda" else [(40, 300), (16, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SILU_SHAPES)
@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
def test_silu_mul_in_the_gemm_is_silu_and_mul_of_its_product(dtype, n, k, m):
    gen = torch.Generator(device=DEVICE).manual_seed(m + n + k)
    gate_up = (torch.randn(2 * n, k, generator=gen, device=DEVICE) * 0.1).to(dtype)
    x = torch.randn(m, k + 8, generator=gen, device=DEVICE).to(dtype)[:, :k]
    act = skinny_gemm_silu_mul(x, gate_up)
    assert act.shape == (m, n)
    assert torch.equal(act, triton_ops.silu_and_mul(skinny_gemm(x, gate_up)))


@torch.inference_mode()
def test_the_mlp_runs_silu_mul_inside_gate_up_at_few_rows(tiny_model_dir, monkeypatch):
    """A step of <= MAX_ROWS tokens: one fused gate_up a layer, hidden states bitwise those of the
    separate SiLU-mul kernel; more rows keep cuBLAS and the kernel."""
    from tests.conftest import PagedSeqs, allocate_kv_caches
    from workers.config import ModelConfig
    from workers.model_configs import resolve_model
    from workers.weight_loader import load_model

    hf_config, _ = resolve_model(str(tiny_model_dir))
    model = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float16"), hf_config, DEVICE, torch.float16)
    calls = []
    fused = skinny_module.skinny_gemm_silu_mul
    monkeypatch.setattr(skinny_module, "skinny_gemm_silu_mul", lambda *a: calls.append(a[0].shape[0]) or fused(*a))

    def forward(rows_per_seq):
        paged = PagedSeqs(block_size=4, num_blocks=64)
        kv_caches = allocate_kv_caches(hf_config, 64, 4, torch.float16, DEVICE)
        ids, positions, metadata = paged.step({s: [(7 * s + j) % 5000 + 3 for j in range(n)]
                                               for s, n in enumerate(rows_per_seq)}, device=DEVICE)
        return model(ids, positions, kv_caches, metadata)

    with_fusion = forward([5, 3, 1])
    assert calls == [9] * hf_config.num_hidden_layers
    monkeypatch.setattr(linear_module, "FUSE_SILU_MUL", False)
    assert torch.equal(forward([5, 3, 1]), with_fusion)
    assert len(calls) == hf_config.num_hidden_layers, "FUSE_SILU_MUL off runs the SiLU-mul kernel"
    monkeypatch.setattr(linear_module, "FUSE_SILU_MUL", True)
    forward([MAX_ROWS, 1])
    assert len(calls) == hf_config.num_hidden_layers, "more than MAX_ROWS rows keep cuBLAS and the kernel"


def test_a_staged_gemm_that_fails_to_build_leaves_this_kernel_for_the_process(monkeypatch, caplog):
    """staged_gemm.py is written in Gluon, which is experimental: a Triton release that no longer
    builds it costs speed, not the request. Runs on the interpreter too (warps_for forced)."""
    staged = skinny_module.staged_gemm
    if staged is None:
        pytest.skip("this Triton has no Gluon")
    from triton.runtime.errors import OutOfResources

    def fails(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(staged, "_disabled_by", None)
    real_warps_for = staged.warps_for
    monkeypatch.setattr(staged, "warps_for", lambda *a: None if staged._disabled_by else 4)
    monkeypatch.setattr(staged, "staged_gemm", fails)
    dtype = DTYPES[0]
    weight = (torch.randn(64, 256, device=DEVICE) * 0.05).to(dtype)
    x = torch.randn(3, 256, device=DEVICE).to(dtype)
    with caplog.at_level("WARNING", logger=staged.__name__):
        _within_one_rounding(skinny_gemm(x, weight), x.float() @ weight.float().T)
    assert "failed to build" in caplog.text and staged._disabled_by is not None
    assert real_warps_for(x, weight) is None, "the rest of the process keeps this kernel"
