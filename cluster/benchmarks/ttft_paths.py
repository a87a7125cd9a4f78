"""Time to first token of one request at a time, by the way it comes in: what each layer adds.

  python -m cluster.benchmarks.ttft_paths inproc [--requests 30]    # LLM, the engine in this process
  python -m cluster.benchmarks.ttft_paths ray                       # LLM(use_ray=True): the scheduler actor
  python -m cluster.benchmarks.ttft_paths grpc --server HOST:PORT   # a running folovllm serve

Each request is a fresh --prompt-len-token prompt of random ids (no prefix-cache hits), sent after
the one before has finished, with max_tokens=1: the time until generate returns (inproc, ray), or
until the stream's first token (grpc; there also with max_tokens=16, whose first token is not its
last). The first --warmup requests are left out. One JSON line per measurement: the median, min and
max in ms, with FOLOVLLM_ENGINE_LINK as it was set (see docs/deploy.md).
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import time

from scheduler.sampling_params import SamplingParams


def fresh_prompts(count: int, length: int, seed: str) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10000) for _ in range(length)] for _ in range(count)]


def row(args, what: str, seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds[args.warmup:]]
    return {"bench": "ttft_paths", "path": args.path, "what": what, "prompt_len": args.prompt_len,
            "requests": len(ms), "engine_link": os.environ.get("FOLOVLLM_ENGINE_LINK", "1"),
            "median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def through_llm(args) -> list[dict]:
    from cluster.llm import LLM

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine_args = dict(load_format=args.load_format, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       use_ray=args.path == "ray")
    if args.device:
        engine_args["device"] = args.device
    seconds = []
    with LLM(args.model, **engine_args) as llm:
        for prompt in fresh_prompts(args.requests + args.warmup, args.prompt_len, f"{args.path}:1"):
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
    return [row(args, "max_tokens=1", seconds)]


async def through_grpc(args) -> list[dict]:
    from cluster.client import AsyncClient

    rows = []
    async with AsyncClient(args.server) as client:
        await client.model_info(timeout=60)
        for max_tokens in (1, 16):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            seconds = []
            for prompt in fresh_prompts(args.requests + args.warmup, args.prompt_len, f"grpc:{max_tokens}"):
                start, first = time.perf_counter(), None
                async for delta in client.generate_stream(prompt, params):
                    if first is None and delta.token_ids:
                        first = time.perf_counter() - start
                seconds.append(first)
            rows.append(row(args, f"first of max_tokens={max_tokens}", seconds))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", choices=["inproc", "ray", "grpc"])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--server", default="127.0.0.1:50051", help="grpc: the folovllm serve to send to")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B", help="inproc, ray")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default=None, help="inproc, ray: cuda (default where present) or cpu")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        p.error("--requests must be at least 1 and --warmup at least 0")
    rows = asyncio.run(through_grpc(args)) if args.path == "grpc" else through_llm(args)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
