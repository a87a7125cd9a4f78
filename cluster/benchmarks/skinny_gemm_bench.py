"""cuBLAS against the skinny Triton GEMM (workers/layers/skinny_gemm.py) at a few rows, on
Qwen3-0.6B's projection shapes and its lm_head.

Each timing replays a CUDA graph of 28 calls of one shape (two for the lm_head), each on its own
weight, so launch overhead and L2 reuse stay out and the in-graph gaps stay in, as in a decode
step. floor_us is the weight's bytes at --copy-tbps. --sweep also times every (BLOCK_N, BLOCK_K,
warps, stages) in a grid and prints the four fastest with their error against cuBLAS.

  python -m cluster.benchmarks.skinny_gemm_bench [--rows 1,16] [--sweep]
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from workers.layers.skinny_gemm import skinny_gemm

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}  # (N, K)
SWEEP = list(itertools.product([16, 32, 64], [128, 256, 512], [2, 4], [3, 5]))


def graph_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median") / calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--copy-tbps", type=float, default=3.0, help="for floor_us (an H100's copy: ~3.0)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    for name, (n, k) in SHAPES.items():
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

            row = {"bench": "skinny_gemm", "device": torch.cuda.get_device_name(), "shape": name, "rows": m,
                   "n": n, "k": k, "floor_us": n * k * 2 / (args.copy_tbps * 1e6),
                   "cublas_us": graph_us(lambda: [torch.matmul(x, w.T, out=o) for w, o in zip(weights, outs)], calls)}
            row["skinny_us"], row["rel_err_vs_cublas"] = time_config()
            if args.sweep:
                timed = sorted((*time_config(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns), bn, bk, nw, ns)
                               for bn, bk, nw, ns in SWEEP if bk <= k)
                row["fastest"] = [dict(zip(("us", "rel_err", "block_n", "block_k", "warps", "stages"), t))
                                  for t in timed[:4]]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
