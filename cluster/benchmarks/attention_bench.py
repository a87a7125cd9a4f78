"""Decode attention bandwidth: paged Triton decode kernel vs the card's measured copy bandwidth.

Qwen3-0.6B shapes for one layer (16 query heads, 8 kv heads, head_dim 128, bf16, block size 16).
Bytes counted: K and V of every context token once, plus the query read and the output written.
Each timing replays a CUDA graph of R decode calls, each over its own random block tables in one
large cache (R chosen so that a replay reads >= 1 GB, at most 28, like one step over 28 layers),
so host launch overhead and L2 reuse stay out of the numbers (the gaps between kernels inside a
graph stay in, as in a captured decode step). Median of triton.testing.do_bench.

  python cluster/benchmarks/attention_bench.py [--out-dir DIR] [--prefill] [--sweep] [--sweep-tiles]
      [--mixed] [--no-grid] [--prefix-hit]

Prints one JSON object per line and the decode table after the grid; writes attention_bench.json and a plot
(attention_bench.png) when matplotlib imports, else attention_bench.csv.
"""
import argparse
import itertools
import json
import math
import os

import torch
import triton

from cluster.benchmarks.skinny_gemm_bench import graph_us
from workers.attention.triton_decode import paged_decode_attention
from workers.attention.triton_prefill import paged_prefill_attention, prefill_tile_map, prefill_tokens_per_tile
from workers.attention.triton_backend import TritonBackend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
DTYPE = torch.bfloat16
CONTEXTS = [512, 2048, 8192]
BATCHES = [1, 8, 32, 64, 128, 256]
TOKEN_BYTES = 2 * NUM_KV_HEADS * HEAD_DIM * 2  # K and V of one token, one layer


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second for a 2 GiB device-to-device copy."""
    src = torch.randn(2**30 // 2, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3)


class DecodeBench:
    def __init__(self, cache_gib: float = 16.0):
        num_blocks = int(cache_gib * 2**30 // (BLOCK_SIZE * TOKEN_BYTES))
        self.kv_cache = torch.empty(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE,
                                    device="cuda").normal_()
        self.num_blocks = num_blocks

    def inputs(self, batch: int, context: int):
        blocks_per_seq = math.ceil(context / BLOCK_SIZE)
        set_bytes = batch * context * TOKEN_BYTES
        sets = max(1, min(28, math.ceil(2**30 / set_bytes),
                          (self.num_blocks - 1) // (batch * blocks_per_seq)))
        perm = torch.randperm(self.num_blocks - 1, device="cuda").to(torch.int32) + 1
        out = []
        for r in range(sets):
            ids = perm[r * batch * blocks_per_seq:(r + 1) * batch * blocks_per_seq]
            out.append(dict(
                query=torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
                block_tables=ids.view(batch, blocks_per_seq).contiguous(),
                seq_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
                out=torch.empty(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")))
        return out

    def mixed_inputs(self, batch: int, lo: int, hi: int, seed: int):
        """Like inputs(), with each sequence's context uniform in [lo, hi] (as in a serving batch)."""
        gen = torch.Generator(device="cuda").manual_seed(seed)
        sets = self.inputs(batch, hi)
        for s in sets:
            s["seq_lens"] = torch.randint(lo, hi + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        return sets

    def time(self, batch: int, context: int, num_splits: int, sets=None, longest_first: bool = False,
             **config) -> dict:
        sets = sets if sets is not None else self.inputs(batch, context)
        for s in sets:  # sorted outside the graph: the engine sorts once a step, for all its layers
            s["order"] = torch.argsort(s["seq_lens"], descending=True).to(torch.int32) if longest_first else None
        counters = torch.zeros(batch * NUM_KV_HEADS, dtype=torch.int32, device="cuda")

        def step():
            for s in sets:
                paged_decode_attention(s["query"], self.kv_cache, s["block_tables"],
                                       s["seq_lens"], HEAD_DIM ** -0.5, num_splits,
                                       out=s["out"], counters=counters, order=s["order"],
                                       **config)
        step()  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        moved = sum(int(s["seq_lens"].sum()) * TOKEN_BYTES + 2 * batch * NUM_HEADS * HEAD_DIM * 2 for s in sets)
        return dict(batch=batch, context=context, num_splits=num_splits, layers=len(sets),
                    us_per_call=1e3 * ms / len(sets), bytes_per_s=moved / (ms * 1e-3),
                    longest_first=longest_first, **config)

    def check(self, batch: int, context: int, num_splits: int, **config) -> float:
        """Relative error of one config against the single-split default (all configs must agree)."""
        s = self.inputs(batch, context)[0]
        args = (s["query"], self.kv_cache, s["block_tables"], s["seq_lens"], HEAD_DIM ** -0.5)
        ref = paged_decode_attention(*args, 1, fused_merge=False).float()
        got = paged_decode_attention(*args, num_splits, **config).float()
        return float((got - ref).norm() / ref.norm())


def run_grid(bench, backend, copy_bw) -> list[dict]:
    rows = []
    for context, batch in itertools.product(CONTEXTS, BATCHES):
        splits = backend.num_decode_splits(batch, NUM_KV_HEADS, context)
        row = bench.time(batch, context, splits, longest_first=backend.longest_first)
        row["pct_of_copy"] = 100 * row["bytes_per_s"] / copy_bw
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def mixed_lengths(bench, copy_bw) -> list[dict]:
    """Contexts uniform in a range, as in the offline throughput workload's decode steps (prompts
    of 100-1024 tokens, then up to 1024 outputs): program order and split policy against bandwidth."""
    rows = []
    for (lo, hi), batch in itertools.product([(100, 1100), (600, 2000)], [16, 32, 64, 128, 256]):
        sets = bench.mixed_inputs(batch, lo, hi, seed=batch)
        for per_sm, longest_first in itertools.product([2, 4, 8], [False, True]):
            splits = TritonBackend(programs_per_sm=per_sm).num_decode_splits(batch, NUM_KV_HEADS, 4096)
            row = bench.time(batch, hi, splits, sets=sets, longest_first=longest_first)
            row.update(context=f"{lo}-{hi}", programs_per_sm=per_sm, pct_of_copy=100 * row["bytes_per_s"] / copy_bw)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def sweep_splits(bench) -> list[dict]:
    """Split policy and fused vs separate merge, per case, where the split count matters."""
    cases = [(512, 1), (2048, 1), (8192, 1), (512, 8), (2048, 8), (8192, 8), (2048, 32)]
    rows = []
    for context, batch in cases:
        for per_sm, min_tokens in [(2, 256), (2, 128), (4, 128), (4, 64)]:
            backend = TritonBackend(programs_per_sm=per_sm, min_split_tokens=min_tokens,
                                    max_decode_splits=64)
            splits = backend.num_decode_splits(batch, NUM_KV_HEADS, context)
            for fused in (False, True):
                row = bench.time(batch, context, splits, fused_merge=fused)
                row.update(programs_per_sm=per_sm, min_split_tokens=min_tokens)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def sweep_tiles(bench, copy_bw) -> dict:
    """Kernel tile configs, then split policies, on the contexts/batches that matter."""
    cases = [(2048, 8), (2048, 64), (8192, 1), (8192, 32), (8192, 256), (512, 256)]
    results = []
    for block_n, num_warps, num_stages in itertools.product([32, 64, 128], [4, 8], [2, 3]):
        config = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        err = bench.check(37, 3000, 4, **config)
        total = 0.0
        for context, batch in cases:
            splits = TritonBackend().num_decode_splits(batch, NUM_KV_HEADS, context)
            total += bench.time(batch, context, splits, **config)["us_per_call"]
        results.append(dict(config=config, total_us=total, rel_err=err))
        print(json.dumps(results[-1]), flush=True)
    best = min((r for r in results if r["rel_err"] < 1e-2), key=lambda r: r["total_us"])
    policies = []
    for per_sm, min_tokens in itertools.product([1, 2, 4, 8], [128, 256, 512]):
        backend = TritonBackend(programs_per_sm=per_sm, min_split_tokens=min_tokens)
        total = sum(bench.time(b, c, backend.num_decode_splits(b, NUM_KV_HEADS, c),
                               **best["config"])["us_per_call"] for c, b in cases)
        policies.append(dict(programs_per_sm=per_sm, min_split_tokens=min_tokens, total_us=total))
        print(json.dumps(policies[-1]), flush=True)
    return dict(configs=results, best_config=best, policies=policies,
                best_policy=min(policies, key=lambda p: p["total_us"]))


def prefill_bench() -> list[dict]:
    """Paged prefill (no prefix, and chunks over a prefix) vs torch SDPA on contiguous tensors."""
    rows = []
    for num_seqs, prefix, chunk in [(8, 0, 2048), (8, 4096, 512), (1, 0, 8192)]:
        seq_len = prefix + chunk
        blocks_per_seq = math.ceil(seq_len / BLOCK_SIZE)
        kv_cache = torch.randn(2, num_seqs * blocks_per_seq + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                               dtype=DTYPE, device="cuda")
        tables = (torch.randperm(num_seqs * blocks_per_seq, device="cuda").to(torch.int32) + 1)
        tables = tables.view(num_seqs, blocks_per_seq)
        query = torch.randn(num_seqs * chunk, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
        qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * chunk
        ms = triton.testing.do_bench(lambda: paged_prefill_attention(
            query, kv_cache, tables, seq_lens, qsl, HEAD_DIM ** -0.5), return_mode="median")
        # causal FLOPs: each query attends to prefix + its position + 1 keys, 2 matmuls x 2 flops
        keys = num_seqs * (chunk * prefix + chunk * (chunk + 1) / 2)
        flops = 4 * NUM_HEADS * HEAD_DIM * keys
        q = query.view(num_seqs, chunk, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        k = torch.randn(num_seqs, NUM_KV_HEADS, seq_len, HEAD_DIM, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        mask = None if prefix == 0 else torch.ones(chunk, seq_len, dtype=torch.bool,
                                                   device="cuda").tril(prefix)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=prefix == 0, enable_gqa=True)
        ms_sdpa = triton.testing.do_bench(sdpa, return_mode="median")
        row = dict(kind="prefill", num_seqs=num_seqs, prefix=prefix, chunk=chunk, ms=ms,
                   tflops=flops / (ms * 1e-3) / 1e12, sdpa_ms=ms_sdpa,
                   sdpa_tflops=flops / (ms_sdpa * 1e-3) / 1e12)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _layers_us(fn, layers: int = 28) -> float:
    """us a call of fn, from a CUDA graph of `layers` calls (a step's 28 layers), launch cost out."""
    return graph_us(lambda: [fn() for _ in range(layers)], layers)


def prefix_hit_bench(max_model_len: int = 4096) -> list[dict]:
    """A prefix-cache hit's attention: T query tokens of one sequence over 2,048 cached ones, with
    the split count TritonBackend captures for such a step, at several tile heights (rows are
    (token, head) pairs: a 4-token hit fills 8 of the default 128), against the decode kernel over
    the same context (batch 1), the floor a few-token step could reach."""
    backend, context, group = TritonBackend(), 2048, NUM_HEADS // NUM_KV_HEADS
    blocks = math.ceil((context + 16) / BLOCK_SIZE)
    kv_cache = torch.randn(2, blocks + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    tables = torch.arange(1, blocks + 1, dtype=torch.int32, device="cuda").view(1, blocks)
    programs = -(-backend.programs_per_sm * backend.num_sms // NUM_KV_HEADS)
    rows = []
    for num_tokens in (4, 16):
        query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        seq_lens = torch.tensor([context + num_tokens], dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, num_tokens], dtype=torch.int32, device="cuda")
        splits = backend.num_prefill_splits(num_tokens, NUM_KV_HEADS, group, max_model_len)
        for block_m, warps in [(128, 8), (64, 4), (32, 4), (32, 2)]:
            # the tile map is made once a forward, not a layer: outside the timed calls
            tile_map = prefill_tile_map(qsl, num_tokens, prefill_tokens_per_tile(group, block_m))
            us = _layers_us(lambda: paged_prefill_attention(
                query, kv_cache, tables, seq_lens, qsl, HEAD_DIM ** -0.5, tile_map=tile_map,
                num_splits=splits, split_programs=programs, block_m=block_m, num_warps=warps))
            rows.append(dict(kind="prefix_hit", tokens=num_tokens, context=context, splits=splits,
                             block_m=block_m, num_warps=warps, us=us))
            print(json.dumps(rows[-1]), flush=True)
    one = torch.randn(1, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    lens = torch.tensor([context + 1], dtype=torch.int32, device="cuda")
    splits = backend.num_decode_splits(1, NUM_KV_HEADS, max_model_len)
    us = _layers_us(lambda: paged_decode_attention(one, kv_cache, tables, lens, HEAD_DIM ** -0.5, splits))
    rows.append(dict(kind="prefix_hit_decode_floor", tokens=1, context=context, splits=splits, us=us))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def save(rows, out_dir, copy_bw):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        with open(os.path.join(out_dir, "attention_bench.csv"), "w") as f:
            f.write("context,batch,num_splits,us_per_call,bytes_per_s,pct_of_copy\n")
            for r in rows:
                f.write(f"{r['context']},{r['batch']},{r['num_splits']},{r['us_per_call']:.2f},"
                        f"{r['bytes_per_s']:.4g},{r['pct_of_copy']:.1f}\n")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for context in CONTEXTS:
        sel = [r for r in rows if r["context"] == context]
        ax.plot([r["batch"] for r in sel], [r["bytes_per_s"] / 1e12 for r in sel], "o-",
                label=f"context {context}")
    ax.axhline(copy_bw / 1e12, color="gray", ls="--", label="device copy")
    ax.axhline(0.7 * copy_bw / 1e12, color="gray", ls=":", label="70% of copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("TB/s")
    ax.set_title(f"paged decode attention, {torch.cuda.get_device_name()}")
    ax.legend()
    fig.savefig(os.path.join(out_dir, "attention_bench.png"), dpi=120, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--sweep", action="store_true", help="also sweep split policies, fused merge")
    parser.add_argument("--sweep-tiles", action="store_true", help="also sweep tile configs")
    parser.add_argument("--prefill", action="store_true", help="also time the prefill kernel")
    parser.add_argument("--mixed", action="store_true", help="also mixed context lengths: order and splits")
    parser.add_argument("--no-grid", action="store_true", help="skip the uniform-context grid")
    parser.add_argument("--prefix-hit", action="store_true",
                        help="also a prefix-cache hit's attention (4 and 16 tokens over 2k) by tile height")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    copy_bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(json.dumps(dict(device=device, copy_bytes_per_s=copy_bw)), flush=True)
    bench = DecodeBench()
    result = dict(device=device, copy_bytes_per_s=copy_bw)
    if not args.no_grid:
        rows = result["decode"] = run_grid(bench, TritonBackend(), copy_bw)
        save(rows, args.out_dir, copy_bw)
        print_table(rows, device, copy_bw)
    if args.mixed:
        result["mixed"] = mixed_lengths(bench, copy_bw)
    if args.prefill:
        result["prefill"] = prefill_bench()
    if args.prefix_hit:
        result["prefix_hit"] = prefix_hit_bench()
    if args.sweep:
        result["sweep_splits"] = sweep_splits(bench)
    if args.sweep_tiles:
        result["sweep_tiles"] = sweep_tiles(bench, copy_bw)
    with open(os.path.join(args.out_dir, "attention_bench.json"), "w") as f:
        json.dump(result, f, indent=1)


def print_table(rows, device, copy_bw):
    print(f"\n{device}: copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'context':>8} {'batch':>6} {'splits':>6} {'us/call':>9} {'TB/s':>6} {'% copy':>7}")
    for r in rows:
        print(f"{r['context']:>8} {r['batch']:>6} {r['num_splits']:>6} {r['us_per_call']:>9.1f} "
              f"{r['bytes_per_s'] / 1e12:>6.2f} {r['pct_of_copy']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
