"""The Ray path's host ceiling: LLM.generate over the Ray engine with no-op workers (no model, a fixed
token per sequence), so what is timed is the driver, the SchedulerActor and the step path alone.

  python -m cluster.benchmarks.ray_host_bench --requests 256 --tokens 200 [--data-parallel-size 2]

Runs on the CPU (only Qwen3-0.6B's config is read). A GPU engine cannot go faster than this on the
same host: compare it with the offline throughput on the GPU to tell host-bound from device-bound.
"""
import argparse
import json
import time

from cluster.llm import LLM
from cluster.ray_engine_core import RayEngineCore
from scheduler.sampling_params import SamplingParams
from workers.worker_actor import NoopWorkerActor


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--num-scheduler-steps", type=int, default=1, help="decode passes per scheduled step")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B", help="only its config is read")
    args = p.parse_args(argv)

    launch = RayEngineCore.launch.__func__
    RayEngineCore.launch = classmethod(lambda cls, config, **kw: launch(cls, config, worker_cls=NoopWorkerActor, **kw))
    with LLM(args.model, load_format="dummy", device="cpu", use_ray=True, num_gpu_blocks=16384,
             max_model_len=1024, max_num_seqs=256, data_parallel_size=args.data_parallel_size,
             num_scheduler_steps=args.num_scheduler_steps) as llm:
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        llm.generate([[5, 6, 7]] * 8, params.clone(max_tokens=8), use_tqdm=False)  # actors and channels warm
        start = time.perf_counter()
        outs = llm.generate([[10 + i, 20, 30] for i in range(args.requests)], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"bench": "ray_host", "dp": args.data_parallel_size,
                      "num_scheduler_steps": args.num_scheduler_steps, "requests": args.requests,
                      "output_tokens": num_out, "seconds": elapsed, "output_tok_per_s": num_out / elapsed}))


if __name__ == "__main__":
    main()
