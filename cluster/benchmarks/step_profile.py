"""Where a step's time goes.

  python -m cluster.benchmarks.step_profile --batch 1 --steps 200
      cProfile over N decode steps at a fixed batch size. Time blocked in the final token copy
      (`tolist`) is GPU time; everything else is host time.
  python -m cluster.benchmarks.step_profile --prefill 128 --steps 20
      N one-token requests of a fresh PREFILL-token prompt each, one at a time through
      LLM.generate (what time to first token measures): cProfile, then torch.profiler's host and
      device time per op.
  python -m cluster.benchmarks.step_profile --prefill 4 --cached-prefix 2048 --steps 20
      the same for prefix-cache hits: each prompt is one shared 2048-token prefix (cached by a
      first request) and PREFILL fresh tokens, as the prefix benchmark's warm request is.
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from cluster.benchmarks.offline import sync_device


def _print_cprofile(prof: cProfile.Profile, top: int) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def profile_decode(llm, args) -> None:
    from scheduler.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    for i in range(args.batch):
        llm.engine.add_request([(7 * i + j) % 5000 for j in range(128)], params)
    for _ in range(10):  # prefill and a few decodes
        llm.engine.step()
    sync_device()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        llm.engine.step()
    prof.disable()
    sync_device()
    per_step = (time.perf_counter() - start) / args.steps
    _print_cprofile(prof, args.top)
    print(f"batch={args.batch} ms_per_step={1e3 * per_step:.3f}")


def profile_prefill(llm, args) -> None:
    from scheduler.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefix = [(17 * j) % 9000 + 1 for j in range(args.cached_prefix)]
    prompts = iter([prefix + [(31 * i + j) % 9000 + 1 for j in range(args.prefill)]
                    for i in range(3 * args.steps + 3)])
    for _ in range(3):
        llm.generate([next(prompts)], params, use_tqdm=False)
    sync_device()
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.generate([next(prompts)], params, use_tqdm=False)
    plain = (time.perf_counter() - start) / args.steps
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        llm.generate([next(prompts)], params, use_tqdm=False)
    prof.disable()
    _print_cprofile(prof, args.top)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as tprof:
        for _ in range(args.steps):
            llm.generate([next(prompts)], params, use_tqdm=False)
        sync_device()
    table = tprof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if torch.cuda.is_available():
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.top))
    print(f"prefill={args.prefill} cached_prefix={args.cached_prefix} ms_per_request={1e3 * plain:.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=0, help="profile prefills of this many tokens instead")
    p.add_argument("--cached-prefix", type=int, default=0,
                   help="with --prefill: every prompt starts with this many tokens of one cached prefix")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    from cluster.llm import LLM

    llm = LLM(args.model, load_format="dummy", max_model_len=max(2048, args.cached_prefix + args.prefill + 16),
              max_num_seqs=max(args.batch, 8), enforce_eager=args.enforce_eager,
              enable_prefix_caching=args.cached_prefix > 0)
    runner = llm.engine.worker.runner
    print(f"backend={runner.attn_backend.name} graphs={runner.decode_graphs is not None} dtype={runner.dtype}")
    (profile_prefill if args.prefill else profile_decode)(llm, args)


if __name__ == "__main__":
    main()
