"""Scale-out runs (issue: scale-out on 4 and 8 GPUs). Each prints JSON lines and appends them to
--out/results.jsonl.

  python -m cluster.benchmarks.scale_out dp --sizes 1,2,4,8
      offline throughput (nano-vllm workload, Qwen3-0.6B dummy) on the Ray path at each data parallel
      size, 256 requests per replica, and the scaling efficiency against DP=1 (--num-scheduler-steps
      k: multi-step decoding, the scheduler's host work once per k tokens)
  python -m cluster.benchmarks.scale_out tp --model Qwen/Qwen3-8B --sizes 1,4,8 --dtype float32
      greedy token ids at each tensor parallel size compared with the smallest size (float32, so
      that only the reduction order differs), then time per output token at each (--perf-sizes
      to time only some; --throughput adds the offline throughput; these runs use the model's
      own dtype, bf16)
  python -m cluster.benchmarks.scale_out tp --sizes 2 --dtype bfloat16 --env-ab FOLOVLLM_FUSE_SILU_MUL=1,0 --equality-only
      greedy token ids at each size with an environment variable at two values, each run in a
      fresh process (a local Ray cluster's workers inherit it): an optimisation switched by a
      variable must leave them equal in the model's own dtype
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _run_json(cmd: list[str], env_overrides: dict[str, str] | None = None) -> list[dict]:
    """Run cmd in a fresh process (a fresh Ray instance), with env_overrides on top of this
    process's environment, and read the JSON lines it prints; its output's tail on failure."""
    env = {**os.environ, **env_overrides} if env_overrides else None
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        setting = "".join(f"{k}={v} " for k, v in (env_overrides or {}).items())
        raise SystemExit(f"{setting}{' '.join(cmd)} exited with {out.returncode}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _offline(args, bench: str, *extra: str) -> list[dict]:
    """cluster.benchmarks.offline's JSON lines, run in a fresh process. Its own results.jsonl and
    plots go to --out's offline/ folder: --out's results.jsonl holds each result once, as this
    script emits it."""
    return _run_json([sys.executable, "-m", "cluster.benchmarks.offline", bench, "--model", args.model, "--use-ray",
                      "--out", str(Path(args.out) / "offline"), *(["--enforce-eager"] if args.enforce_eager else []),
                      *extra])


def _emit(args, result: dict) -> None:
    print(json.dumps(result), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def run_dp(args) -> None:
    """Efficiency is against DP=1's throughput: of this run when --sizes holds 1, else of
    --dp1-tok-per-s (another run's, so say which), else not computed. (It once divided by the
    first size's own figure, printing 1.0 for a lone DP=4.)"""
    base, base_from = args.dp1_tok_per_s, "--dp1-tok-per-s" if args.dp1_tok_per_s else None
    for dp in [int(s) for s in args.sizes.split(",")]:
        result = _offline(args, "throughput", "--data-parallel-size", str(dp),
                          "--num-requests", str(args.requests_per_replica * dp),
                          "--num-scheduler-steps", str(args.num_scheduler_steps))[-1]
        if dp == 1:
            base, base_from = result["output_tok_per_s"], "this run"
        efficiency = result["output_tok_per_s"] / (dp * base) if base else None
        _emit(args, {**result, "bench": "dp_scaling", "efficiency": efficiency, "dp1_from": base_from})


def _greedy_ids(args, tp: int, prompts: list[list[int]]) -> list[list[int]]:
    from cluster.llm import LLM
    from scheduler.sampling_params import SamplingParams

    # a step budget of one context keeps the profiled activations small: float32 Qwen3-32B at TP=2
    # leaves only a few GB of an 80 GB card for them and the KV cache
    with LLM(args.model, load_format="dummy", dtype=args.dtype, tensor_parallel_size=tp, use_ray=True,
             max_model_len=args.max_model_len, max_num_batched_tokens=args.max_model_len,
             max_num_seqs=len(prompts), gpu_memory_utilization=args.gpu_memory_utilization,
             enforce_eager=args.enforce_eager) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _prompts() -> list[list[int]]:
    # 8 prompts of 16 to 184 tokens: their decode steps have at most 8 rows (the few-row paths)
    return [[(97 * i + 7 * j) % 10000 for j in range(16 + 24 * i)] for i in range(8)]


def _first_differences(ids: list[list[int]], reference: list[list[int]]) -> list[int | None]:
    return [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ids, reference)]


def _greedy_ids_with_env(args, tp: int, name: str, value: str) -> list[list[int]]:
    """_greedy_ids in a fresh process with name=value: switches like FOLOVLLM_FUSE_SILU_MUL are
    read once at import, and the Ray workers that process starts inherit its environment."""
    cmd = [sys.executable, "-m", "cluster.benchmarks.scale_out", "ids", "--sizes", str(tp), "--model", args.model,
           "--dtype", args.dtype, "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           *(["--enforce-eager"] if args.enforce_eager else [])]
    return _run_json(cmd, {name: value})[0]["ids"]


def _env_ab(spec: str) -> tuple[str, str, str]:
    name, sep, values = spec.partition("=")
    pair = values.split(",")
    if not name or not sep or len(pair) != 2:
        raise SystemExit(f"--env-ab takes NAME=A,B (two values), got {spec!r}")
    return name, pair[0], pair[1]


def run_tp(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.env_ab and not args.perf_only:
        name, a, b = _env_ab(args.env_ab)
        for tp in sizes:
            ids_a, ids_b = (_greedy_ids_with_env(args, tp, name, v) for v in (a, b))
            _emit(args, {"bench": "tp_env_equality", "model": args.model, "dtype": args.dtype, "tp": tp,
                         "enforce_eager": args.enforce_eager, "env": name, "values": [a, b],
                         "equal": ids_a == ids_b, "first_differing_token": _first_differences(ids_b, ids_a)})
    elif not args.perf_only:
        prompts = _prompts()
        reference = _greedy_ids(args, sizes[0], prompts)
        for tp in sizes[1:]:
            ids = _greedy_ids(args, tp, prompts)
            _emit(args, {"bench": "tp_equality", "model": args.model, "dtype": args.dtype, "tp": tp,
                         "enforce_eager": args.enforce_eager, "reference_tp": sizes[0], "equal": ids == reference,
                         "first_differing_token": _first_differences(ids, reference)})
    if args.equality_only:
        return
    for tp in [int(s) for s in args.perf_sizes.split(",")] if args.perf_sizes else sizes:
        for result in _offline(args, "latency", "--tensor-parallel-size", str(tp), "--batches", "32"):
            _emit(args, {**result, "bench": "tp_latency", "model": args.model})
        if args.throughput:
            for result in _offline(args, "throughput", "--tensor-parallel-size", str(tp)):
                _emit(args, {**result, "bench": "tp_throughput", "model": args.model})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.benchmarks.scale_out", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=["dp", "tp", "ids"], help="ids: one size's greedy ids as JSON (--env-ab runs it)")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--dp1-tok-per-s", type=float, default=None,
                   help="dp: DP=1 throughput from another run, when --sizes lacks 1")
    p.add_argument("--requests-per-replica", type=int, default=256)
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="dp: decode passes per scheduled step (multi-step), for every size")
    p.add_argument("--dtype", default="float32", help="tp: float32 keeps greedy ids comparable across sizes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024, help="tp: of the equality runs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="tp: of the equality runs")
    p.add_argument("--throughput", action="store_true", help="tp: also the offline throughput at each size")
    p.add_argument("--equality-only", action="store_true", help="tp: skip the latency runs")
    p.add_argument("--perf-only", action="store_true",
                   help="tp: skip the equality runs (their float32 loads take most of a stage)")
    p.add_argument("--perf-sizes", default="", help="tp: the sizes to time (default: every size)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--env-ab", default="", metavar="NAME=A,B",
                   help="tp: compare each size's greedy ids with NAME=A and NAME=B (fresh processes) "
                        "instead of against the smallest size")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.run == "ids":  # one process's greedy ids, for --env-ab
        print(json.dumps({"ids": _greedy_ids(args, int(args.sizes), _prompts())}), flush=True)
        return
    {"dp": run_dp, "tp": run_tp}[args.run](args)


if __name__ == "__main__":
    main()
