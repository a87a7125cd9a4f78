"""The scheduler's own host time a step, without a model, an actor or Ray.

  python -m cluster.benchmarks.scheduler_bench --seqs 256 --steps 300 [--num-scheduler-steps 8] [--profile]

N sequences decode together; each step is Scheduler.schedule() then update_from_output() with a
fixed token for each pass the step was given (k of them with --num-scheduler-steps k). This is the
part of the SchedulerActor's step thread that grows with the batch (docs/notes-dp-scaling.md):
times DP, it must stay under a replica's device step.
"""
import argparse
import cProfile
import json
import pstats
import time

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.output import ModelRunnerOutput
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler


def _step(scheduler: Scheduler) -> int:
    """One step; returns the tokens it appended."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    # a decode takes one token a pass; a prefill samples one token at its end
    sampled = [[5] * (n if n <= out.decode_steps else 1) for n in out.num_scheduled_tokens.values()]
    scheduler.update_from_output(out, ModelRunnerOutput(ids, sampled))
    return sum(map(len, sampled))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-scheduler-steps", type=int, default=1, help="decode passes per step (k)")
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = p.parse_args(argv)

    k = args.num_scheduler_steps
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=16384,
                                          num_scheduler_steps=k),
                          CacheConfig(block_size=16), 65536, 4096 + k * args.steps, [151645])
    params = SamplingParams(temperature=0.0, max_tokens=k * (args.steps + 100), ignore_eos=True)
    for i in range(args.seqs):
        scheduler.add_request(f"r{i}", [7 + i] * (100 + 3 * i), params)
    for _ in range(5):  # the prefill and the first decodes
        _step(scheduler)
    start, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += _step(scheduler)
    elapsed = time.perf_counter() - start
    per_step = elapsed / args.steps
    print(json.dumps({"bench": "scheduler", "seqs": args.seqs, "num_scheduler_steps": k,
                      "ms_per_step": 1e3 * per_step, "us_per_seq": 1e6 * per_step / args.seqs,
                      "us_per_token": 1e6 * elapsed / tokens}))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            _step(scheduler)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
