"""The staged GEMM (workers/layers/staged_gemm.py: the weight in shared memory before the PDL wait,
K split across warps) against a float32 product, within the bound test_skinny_gemm.py holds the
Triton GEMM and cuBLAS to; its SiLU-mul epilogue against the SiLU-mul kernel; which weights it
takes, and that skinny_gemm sends it those and only those.
Needs an NVIDIA GPU of compute capability 9 or more and Triton's Gluon; skips elsewhere.
"""
import pytest
import torch

if not torch.cuda.is_available() or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("the staged GEMM needs an NVIDIA GPU of compute capability 9 or more", allow_module_level=True)
pytest.importorskip("triton.experimental.gluon")

from tests.gpu.test_skinny_gemm import _within_one_rounding  # noqa: E402
from workers.layers import skinny_gemm as skinny_module  # noqa: E402
from workers.layers import staged_gemm as staged_module  # noqa: E402
from workers.layers import triton_ops  # noqa: E402
from workers.layers.staged_gemm import staged_gemm, warps_for, warps_for_shape  # noqa: E402

pytestmark = [pytest.mark.gpu]

# (N, K): Qwen3-0.6B's qkv (4 warps), o and down (8 warps; down's 48 chunks as 32 + 16), a TP=2
# down shard (24 chunks), and a partial last program
SHAPES = [(4096, 1024), (1024, 2048), (1024, 3072), (1024, 1536), (1000, 512)]


def _inputs(n: int, k: int, m: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)
    x = torch.randn(m, k + 8, generator=gen, device="cuda").to(torch.bfloat16)[:, :k]  # stride(0) != K
    return weight, x


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_staged_gemm_matches_a_float32_product(n, k, m):
    weight, x = _inputs(n, k, m, seed=m * 7 + n + k)
    warps = warps_for(x, weight)
    assert warps is not None, "every shape here is taken"
    out = staged_gemm(x, weight, warps)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    _within_one_rounding(out, x.float() @ weight.float().T)
    assert torch.equal(staged_gemm(x, weight, warps), out), "the warps' sums run in a fixed order"


@pytest.mark.parametrize("n,k", [(3072, 1024), (500, 512)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_silu_mul_in_the_staged_gemm_is_silu_and_mul_of_its_product(n, k, m):
    gate_up, x = _inputs(2 * n, k, m, seed=m + n + k)
    warps = warps_for(x, gate_up, silu_mul=True)
    act = staged_gemm(x, gate_up, warps, silu_mul=True)
    assert act.shape == (m, n)
    assert torch.equal(act, triton_ops.silu_and_mul(staged_gemm(x, gate_up, warps)))


def test_the_warps_rule():
    assert warps_for_shape(4096, 1024, False, 132) == 4  # 256 programs: four warps each
    assert warps_for_shape(1024, 3072, False, 132) == 8  # 64 programs, at most half the SMs: eight
    assert warps_for_shape(6144, 1024, True, 132) == 4  # gate_up: 384 programs
    assert warps_for_shape(1024, 3072, False, 78) == 4  # 64 programs are more than half of 78 SMs
    assert warps_for_shape(151936, 1024, False, 132) is None  # an lm_head: 9,496 programs
    assert warps_for_shape(1024, 4096, False, 132) is None  # 16 rows of 4096 are 128 KiB
    assert warps_for_shape(1024, 1000, False, 132) is None  # not whole 64-column chunks
    assert warps_for_shape(1024, 32, False, 132) is None  # no whole chunk at all
    assert warps_for_shape(1024, 64 * 7, False, 132) is None  # 7 chunks: 4 + 3
    assert warps_for_shape(1024, 64 * 20, False, 132) is None  # 16 + 4 chunks: eight warps don't divide 4


def test_warps_for_takes_only_bfloat16_rows_it_can_read():
    weight, x = _inputs(4096, 1024, 4, seed=3)
    assert warps_for(x, weight) == warps_for_shape(4096, 1024, False, staged_module._num_sms(0))
    assert warps_for(x.half(), weight.half()) is None
    assert warps_for(torch.empty(17, 1024, dtype=torch.bfloat16, device="cuda"), weight) is None
    assert warps_for(x.cpu(), weight.cpu()) is None
    assert warps_for(torch.empty(4, 1025, dtype=torch.bfloat16, device="cuda")[:, 1:], weight) is None  # unaligned


def test_skinny_gemm_sends_the_weights_it_takes_to_it(monkeypatch):
    calls = []
    real = staged_module.staged_gemm
    monkeypatch.setattr(staged_module, "staged_gemm", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    weight, x = _inputs(4096, 1024, 4, seed=1)
    ref = x.float() @ weight.float().T
    _within_one_rounding(skinny_module.skinny_gemm(x, weight), ref)
    skinny_module.skinny_gemm_silu_mul(x, weight)
    assert len(calls) == 2
    big, x_big = _inputs(64, 4096, 4, seed=2)  # 16 rows of 4096 do not fit in shared memory
    _within_one_rounding(skinny_module.skinny_gemm(x_big, big), x_big.float() @ big.float().T)
    skinny_module.skinny_gemm(x.half(), weight.half())  # float16: the Triton kernel
    skinny_module.skinny_gemm(x, weight, block_n=16)  # explicit blocks: the Triton kernel
    assert len(calls) == 2
    monkeypatch.setattr(skinny_module, "STAGED", False)
    _within_one_rounding(skinny_module.skinny_gemm(x, weight), ref)
    assert len(calls) == 2, "FOLOVLLM_STAGED_GEMM=0 keeps the Triton kernel"

