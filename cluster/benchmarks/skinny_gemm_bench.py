"""cuBLAS against the skinny Triton GEMM (workers/layers/skinny_gemm.py) at a few rows, on a
Qwen3 size's projection shapes (unsharded) and its lm_head: Qwen3-0.6B unless --model names another.

Each timing replays a CUDA graph of 28 calls of one shape (two for the lm_head), each on its own
weight, so launch overhead and L2 reuse stay out and the in-graph gaps stay in, as in a decode
step. floor_us is the weight's bytes at --copy-tbps; skinny_l2_prefetch_us is the GEMM with its
L2 prefetch (off by default: workers/layers/skinny_gemm.py says why); where the weight goes to
staged_gemm.py's kernel (staged: true), skinny_us is that kernel and skinny_triton_us the Triton
one (FOLOVLLM_STAGED_GEMM=0). --sweep also times every
(BLOCK_N, BLOCK_K, warps, stages) in a grid and prints the six fastest with their error against
cuBLAS (and every timing under "timed"); --sweep-large does the same over a grid for the larger
sizes, each configuration with the prefetch on and off.
gate_up's row also times it as a layer runs it, after the residual add + RMSNorm kernel: with the
SiLU-mul kernel after it (norm_gate_up_silu_us) and with SiLU-mul in its epilogue
(norm_gate_up_fused_us, skinny_gemm_silu_mul).

  python -m cluster.benchmarks.skinny_gemm_bench [--rows 1,16] [--sweep | --sweep-large] [--model Qwen/Qwen3-8B]
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from workers.layers import triton_ops
from workers.layers import skinny_gemm as skinny_module
from workers.layers.skinny_gemm import skinny_gemm, skinny_gemm_silu_mul, staged_gemm
from workers.model_configs import BUILTIN_CONFIGS


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a built-in Qwen3 size, one GPU's (no tensor parallelism)."""
    c = BUILTIN_CONFIGS[model]
    q, kv, hidden, inter = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], \
        c["hidden_size"], c["intermediate_size"]
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter),
            "lm_head": (c["vocab_size"], hidden)}

SWEEP = list(itertools.product([16, 32, 64], [128, 256, 512], [2, 4], [3, 5]))
# --sweep-large: fewer K blocks, more stages and the L2 prefetch on and off, for the large sizes'
# shapes (a weight slice per program many times larger than at 0.6B)
SWEEP_LARGE = list(itertools.product([16, 32, 64], [128, 256], [2, 4], [3, 4, 6]))


def graph_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median") / calls


def _mlp_front_us(x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> dict:
    """A layer's norm, gate_up and SiLU-mul, as three kernels and as two (the epilogue)."""
    residual, norm_weight = torch.randn_like(x), torch.ones(x.shape[1], dtype=x.dtype, device=x.device)

    def three_kernels():
        for w in weights:
            h, _ = triton_ops.fused_add_rms_norm(x, residual, norm_weight, 1e-6)
            triton_ops.silu_and_mul(skinny_gemm(h, w))

    def fused():
        for w in weights:
            h, _ = triton_ops.fused_add_rms_norm(x, residual, norm_weight, 1e-6)
            skinny_gemm_silu_mul(h, w)

    return {"norm_gate_up_silu_us": graph_us(three_kernels, calls), "norm_gate_up_fused_us": graph_us(fused, calls)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-large", action="store_true", help="SWEEP_LARGE, each with and without the L2 prefetch")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B", choices=sorted(BUILTIN_CONFIGS))
    p.add_argument("--copy-tbps", type=float, default=3.0, help="for floor_us (an H100's copy: ~3.0)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    for name, (n, k) in shapes(args.model).items():
        calls = 2 if name == "lm_head" else 28
        weights = [torch.randn(n, k, dtype=dtype, device="cuda") * 0.02 for _ in range(calls)]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            outs = [torch.empty(m, n, dtype=dtype, device="cuda") for _ in weights]
            ref = F.linear(x, weights[0]).float()

            def time_config(**config):
                got = skinny_gemm(x, weights[0], **config).float()
                us = graph_us(lambda: [skinny_gemm(x, w, out=o, **config) for w, o in zip(weights, outs)], calls)
                return us, float((got - ref).abs().max() / ref.abs().max())

            row = {"bench": "skinny_gemm", "device": torch.cuda.get_device_name(), "model": args.model,
                   "shape": name, "rows": m,
                   "n": n, "k": k, "floor_us": n * k * 2 / (args.copy_tbps * 1e6),
                   "cublas_us": graph_us(lambda: [torch.matmul(x, w.T, out=o) for w, o in zip(weights, outs)], calls)}
            row["skinny_us"], row["rel_err_vs_cublas"] = time_config()
            row["staged"] = (skinny_module.STAGED and staged_gemm is not None
                             and staged_gemm.warps_for(x, weights[0]) is not None)
            if row["staged"]:  # skinny_us was staged_gemm.py's kernel: the Triton one beside it
                skinny_module.STAGED = False
                row["skinny_triton_us"] = time_config()[0]
                skinny_module.STAGED = True
            row["skinny_l2_prefetch_us"] = time_config(prefetch=True)[0]
            if name == "gate_up":
                row.update(_mlp_front_us(x, weights, calls))
            if args.sweep or args.sweep_large:
                grid = ([(*c, None) for c in SWEEP] if args.sweep else
                        [(*c, p) for c in SWEEP_LARGE for p in (True, False)])
                timed = []
                for bn, bk, nw, ns, pf in grid:
                    if bk > k:
                        continue
                    try:
                        us, err = time_config(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, prefetch=pf)
                    except OutOfResources:  # more shared memory than the card has: not a candidate
                        continue
                    timed.append((us, err, bn, bk, nw, ns, pf))
                timed.sort(key=lambda t: t[0])
                row["fastest"] = [dict(zip(("us", "rel_err", "block_n", "block_k", "warps", "stages", "prefetch"), t))
                                  for t in timed[:6]]
                # every timing: [us, block_n, block_k, warps, stages, prefetch]
                row["timed"] = [[round(t[0], 2), *t[2:]] for t in timed]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
