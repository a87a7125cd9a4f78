"""The Ray step path, without a model: compiled graph vs plain actor calls.

    python -m cluster.benchmarks.ray_step_bench --tp 1 2 --steps 2000

Workers are NoopWorkerActors (no weights, a fixed token per scheduled sequence), so what is timed
is Ray: (1) an empty step's round trip from the SchedulerActor's step thread to rank 0's output,
and a 64-sequence decode step's (payload as in production); (2) end to end through EngineClient,
64 streams decoding 128 tokens each, steps per second including scheduling and output delivery.
"""
import argparse
import asyncio
import statistics
import time

import ray

from cluster.config import EngineConfig
from cluster.launcher import launch_engine
from scheduler.output import CachedRequestData, SchedulerOutput
from scheduler.sampling_params import SamplingParams
from workers.worker_actor import NoopWorkerActor


def _decode_step(num_seqs: int) -> SchedulerOutput:
    ids = [f"req-{i}#0" for i in range(num_seqs)]
    cached = CachedRequestData(ids, [[] for _ in ids], [100 + i for i in range(num_seqs)])
    return SchedulerOutput(1, [], cached, {r: 1 for r in ids}, num_seqs)


def time_round_trips(core, num_steps: int, num_seqs: int) -> dict:
    """Runs on the SchedulerActor's step thread: submit().result() of one replica, num_steps times."""
    executor = core.replicas[0].executor
    step = _decode_step(num_seqs) if num_seqs else SchedulerOutput(0, [], CachedRequestData(), {}, 0)
    for _ in range(50):
        executor.submit(step).result()
    times = []
    for _ in range(num_steps):
        t = time.perf_counter()
        executor.submit(step).result()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"compiled_graph": executor.uses_compiled_graph, "mean_ms": statistics.fmean(times),
            "p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99)]}


async def _stream_all(client, num_requests: int, max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i):
        stream = await client.add_request(f"bench-{i}", [10 + i, 20, 30], params)
        async for _ in stream:
            pass

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(num_requests)))
    return time.perf_counter() - t


def bench(tp: int, compiled: bool, steps: int, model: str) -> dict:
    config = EngineConfig.from_flat(model=model, load_format="dummy", num_gpu_blocks=4096, max_model_len=1024,
                                    tensor_parallel_size=tp, device="cpu", use_ray=True)
    client, shutdown = launch_engine(config, use_compiled_graph=compiled, worker_cls=NoopWorkerActor)
    try:
        result = {"tp": tp}
        result["empty"] = ray.get(client.actor.call_on_step_thread.remote(time_round_trips, steps, 0))
        result["decode64"] = ray.get(client.actor.call_on_step_thread.remote(time_round_trips, steps, 64))
        asyncio.run(_stream_all(client, 8, 8))  # warm up the client path
        elapsed = asyncio.run(_stream_all(client, 64, 128))
        result["e2e_steps_per_s"] = 128 / elapsed
        return result
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B", help="only its config is read")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    for tp in args.tp:
        for compiled in (True, False):
            r = bench(tp, compiled, args.steps, args.model)
            path = "compiled graph" if r["empty"]["compiled_graph"] else "plain calls"
            print(f"tp={tp} {path:15s} empty step {r['empty']['mean_ms']:.3f} ms (p50 {r['empty']['p50_ms']:.3f}, "
                  f"p99 {r['empty']['p99_ms']:.3f}) | 64-seq decode step {r['decode64']['mean_ms']:.3f} ms | "
                  f"end to end {r['e2e_steps_per_s']:.0f} steps/s", flush=True)


if __name__ == "__main__":
    main()
