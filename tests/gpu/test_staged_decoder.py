"""The staged GEMM's RMSNorm prologue and residual epilogue (workers/layers/staged_gemm.py), and the
decoder layer that folds its norms and adds into its GEMMs with them (workers/layers/staged_decoder.py),
against the separate kernels: a two-layer model of Qwen3-0.6B's shapes in bfloat16, eager and in
CUDA graphs. Needs an NVIDIA GPU of compute capability 9 or more and Triton's Gluon; skips elsewhere.
"""
import copy

import numpy as np
import pytest
import torch

if not torch.cuda.is_available() or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("the staged GEMM needs an NVIDIA GPU of compute capability 9 or more", allow_module_level=True)
pytest.importorskip("triton.experimental.gluon")

from tests.gpu.graph_steps import BLOCK_SIZE, MAX_MODEL_LEN, NUM_BLOCKS, _eager, make_staging, make_step  # noqa: E402
from workers.attention.triton_backend import TritonBackend  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.cuda_graphs import DecodeGraphs  # noqa: E402
from workers.kv_cache import allocate_kv_caches  # noqa: E402
from workers.layers import staged_decoder, triton_ops  # noqa: E402
from workers.layers import staged_gemm as staged_module  # noqa: E402
from workers.layers.staged_gemm import staged_gemm, warps_for  # noqa: E402
from workers.model_configs import resolve_model  # noqa: E402
from workers.weight_loader import load_model  # noqa: E402

pytestmark = [pytest.mark.gpu]
EPS = 1e-6


def _inputs(n: int, k: int, m: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)
    x = (torch.randn(m, k + 8, generator=gen, device="cuda") * 3).to(torch.bfloat16)[:, :k]  # stride(0) != K
    norm_weight = (1 + 0.2 * torch.randn(k, generator=gen, device="cuda")).to(torch.bfloat16)
    return weight, x, norm_weight


def _close_to(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for a normed activation rounded the other way now and then (the float32 sum of
    squares runs in another order than the norm kernel's): most outputs bitwise, all within 2%."""
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert (out == ref).float().mean() > 0.9


@pytest.mark.parametrize("n,k", [(4096, 1024), (2048, 2048), (1000, 512)])
@pytest.mark.parametrize("m", [1, 4, 9, 16])
def test_the_norm_prologue_is_the_norm_kernel_then_the_gemm(n, k, m):
    weight, x, norm_weight = _inputs(n, k, m, seed=m + n + k)
    warps = warps_for(x, weight)
    out = staged_gemm(x, weight, warps, norm_weight=norm_weight, eps=EPS)
    _close_to(out, staged_gemm(triton_ops.rms_norm(x, norm_weight, EPS), weight, warps))
    assert torch.equal(staged_gemm(x, weight, warps, norm_weight=norm_weight, eps=EPS), out)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_norm_and_silu_mul_in_one_staged_gemm(m):
    gate_up, x, norm_weight = _inputs(6144, 1024, m, seed=m)
    warps = warps_for(x, gate_up, silu_mul=True)
    act = staged_gemm(x, gate_up, warps, silu_mul=True, norm_weight=norm_weight, eps=EPS)
    product = staged_gemm(x, gate_up, warps, norm_weight=norm_weight, eps=EPS)
    assert torch.equal(act, triton_ops.silu_and_mul(product)), "the epilogue sees the same product"


@pytest.mark.parametrize("n,k", [(1024, 2048), (1024, 3072)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_the_residual_epilogue_adds_in_place(n, k, m):
    weight, x, _ = _inputs(n, k, m, seed=3 * m + k)
    residual = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    warps = warps_for(x, weight)
    expected = staged_gemm(x, weight, warps) + residual  # a bfloat16 add: the float32 sum rounded once
    out = staged_gemm(x, weight, warps, out=residual, residual=residual)
    assert out.data_ptr() == residual.data_ptr() and torch.equal(residual, expected)


def test_a_staged_linear_that_fails_to_build_gives_the_separate_kernels_result(monkeypatch):
    from triton.runtime.errors import OutOfResources

    weight, x, norm_weight = _inputs(1024, 1024, 4, seed=5)
    warps = warps_for(x, weight)
    residual = torch.randn(4, 1024, device="cuda").to(torch.bfloat16)
    expected = staged_gemm(triton_ops.rms_norm(x, norm_weight, EPS), weight, warps) + residual

    def fails(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(staged_module, "_disabled_by", None)
    monkeypatch.setattr(staged_module, "staged_gemm", fails)
    out = staged_decoder.staged_linear(x, weight, warps, norm_weight=norm_weight, eps=EPS, residual=residual)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # the Triton GEMM sums in another order
    assert staged_module._disabled_by is not None and staged_module.warps_for(x, weight) is None


@pytest.fixture(scope="module")
def small_qwen3():
    """Qwen3-0.6B's shapes and dummy weights, two layers, bfloat16, the Triton attention backend."""
    hf_config = copy.deepcopy(resolve_model("Qwen/Qwen3-0.6B")[0])  # not the shared config object
    hf_config.num_hidden_layers = 2
    model_config = ModelConfig(model="Qwen/Qwen3-0.6B", dtype="bfloat16", load_format="dummy")
    model = load_model(model_config, hf_config, "cuda", torch.bfloat16, attn_backend=TritonBackend("cuda"))
    return model, hf_config


def _caches(hf_config) -> list[torch.Tensor]:
    torch.manual_seed(0)
    caches = allocate_kv_caches(hf_config, NUM_BLOCKS, BLOCK_SIZE, torch.bfloat16, torch.device("cuda"))
    for cache in caches:
        cache.normal_()
    return caches


STEPS = [([40], [1]), ([300], [4]), ([20, 33, 200, 16], [1, 1, 7, 1]), (list(range(10, 170, 10)), [1] * 16)]


@torch.inference_mode()
@pytest.mark.parametrize("context_lens,query_lens", STEPS)
def test_the_staged_layer_gives_the_plain_layers_hidden_states_and_cache(small_qwen3, monkeypatch,
                                                                        context_lens, query_lens):
    model, hf_config = small_qwen3
    step = make_step(np.random.default_rng(len(query_lens)), context_lens, query_lens)
    calls = []
    real = staged_decoder.staged_linear
    monkeypatch.setattr(staged_decoder, "staged_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    caches = _caches(hf_config)
    staged = _eager(model, step, caches).clone()
    assert len(calls) == 4 * hf_config.num_hidden_layers, "every projection took the staged GEMM"
    monkeypatch.setattr(staged_decoder, "STAGED_NORMS", False)
    plain_caches = _caches(hf_config)
    plain = _eager(model, step, plain_caches)
    assert len(calls) == 4 * hf_config.num_hidden_layers, "FOLOVLLM_STAGED_NORMS=0 keeps the plain layer"
    _close_to(staged, plain)
    for got, want in zip(caches, plain_caches):
        _close_to(got, want)


@torch.inference_mode()
def test_decode_graphs_of_staged_layers_replay_the_eager_step(small_qwen3):
    """The residual stream is updated in place inside a captured graph: each replay must start from
    the step's own embedding, whatever the replay before it left there."""
    model, hf_config = small_qwen3
    caches = _caches(hf_config)
    graphs = DecodeGraphs(model, [c.clone() for c in caches], max_num_seqs=16, max_model_len=MAX_MODEL_LEN,
                          block_size=BLOCK_SIZE, device=torch.device("cuda"), staging=make_staging(256, 16))
    graphs.capture()
    rng = np.random.default_rng(7)
    for context_lens, query_lens in STEPS + STEPS[:2]:
        step = make_step(rng, context_lens, query_lens)
        graphs.staging.begin_step()
        hidden = graphs.run(step).clone()
        graphs.staging.end_step()
        # the attention may split a padded graph step otherwise than the eager one: close, not bitwise
        _close_to(hidden, _eager(model, step, caches))
