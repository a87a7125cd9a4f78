"""The scheduler's own host time a step, without a model, an actor or Ray.

  python -m cluster.benchmarks.scheduler_bench --seqs 256 --steps 300 [--profile]

N sequences decode together; each step is Scheduler.schedule() then update_from_output() with one
fixed token per sequence. This is the part of the SchedulerActor's step thread that grows with
the batch (docs/notes-dp-scaling.md): times DP, it must stay under a replica's device step.
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


def _step(scheduler: Scheduler) -> None:
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    scheduler.update_from_output(out, ModelRunnerOutput(ids, [[5]] * len(ids)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = p.parse_args(argv)

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=16384),
                          CacheConfig(block_size=16), 65536, 4096, [151645])
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 100, ignore_eos=True)
    for i in range(args.seqs):
        scheduler.add_request(f"r{i}", [7 + i] * (100 + 3 * i), params)
    for _ in range(5):  # the prefill and the first decodes
        _step(scheduler)
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(scheduler)
    per_step = (time.perf_counter() - start) / args.steps
    print(json.dumps({"bench": "scheduler", "seqs": args.seqs, "ms_per_step": 1e3 * per_step,
                      "us_per_seq": 1e6 * per_step / args.seqs}))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            _step(scheduler)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
