"""Where one decode step's time goes: cProfile over N decode steps at a fixed batch size.

  python -m cluster.benchmarks.step_profile --batch 1 --steps 200
Time blocked in the final token copy (`tolist`) is GPU time; everything else is host time.
"""
import argparse
import cProfile
import io
import pstats
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    from cluster.llm import LLM
    from scheduler.sampling_params import SamplingParams

    llm = LLM(args.model, load_format="dummy", max_model_len=2048, max_num_seqs=max(args.batch, 8),
              enforce_eager=args.enforce_eager)
    runner = llm.engine.worker.runner
    print(f"backend={runner.attn_backend.name} graphs={runner.decode_graphs is not None} dtype={runner.dtype}")
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    for i in range(args.batch):
        llm.engine.add_request([(7 * i + j) % 5000 for j in range(128)], params)
    for _ in range(10):  # prefill and a few decodes
        llm.engine.step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        llm.engine.step()
    prof.disable()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    print(f"batch={args.batch} ms_per_step={1e3 * per_step:.3f}")


if __name__ == "__main__":
    main()
