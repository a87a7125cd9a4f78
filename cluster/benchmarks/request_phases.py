"""Where one request's time to first token goes, cold and from the prefix cache (issue 6, 4e).

  python -m cluster.benchmarks.request_phases [--prefix-len 2048] [--requests 12] [--kernels]

Each request is a fresh --prefix-len-token prefix plus 4 tokens (cold), then the same prefix plus
4 other tokens (warm), one token each through LLM.generate, in process. The worker's methods are
wrapped to stamp, in ms from the call to generate (medians over the requests, the first two left
out as warm-up):
  launch0   the scheduler is done and the worker starts the step (request checks, the prefix
            lookup, scheduling)
  forward0 / forward1   the forward's launch: inputs to the device, graph replay, lm_head
  replay0 / replay1     the graph replay's launch within it (CUDA only)
  sample0 / sample1     the sampler's launch
  wait0 / tokens        waiting for the device, and the tokens back on the host
  total     generate returned (the outputs applied)
With --host-detail, more of the host's path, each stamped on entry (0) and exit (1) of its first
call in the request: the token-id check, scheduling and its prefix-cache walk, the batch update and
input preparation, the decode graphs' row layouts and staging copy, the output objects built while
the device runs (build), and after the tokens the scheduler's update and the outputs applied.
Then the graphs the requests replayed (the warm hit's decode rows, the cold prompt's prefill, and
a batch-1 decode) are replayed alone after a sync: the host's launch time, and the device's span
between events around it; with --kernels, also each graph's kernels by name (count, us each).
On the CPU the wrappers still run, without the graph probe.
"""
import argparse
import contextlib
import json
import statistics
import time

import torch

from cluster.benchmarks.offline import sync_device
from workers import model_runner as mr

_STAMPS = {}


def _stamped(fn, before: str, after: str, once: bool = False):
    def wrapper(*args, **kwargs):
        if not (once and before in _STAMPS):
            _STAMPS[before] = time.perf_counter()
        out = fn(*args, **kwargs)
        if not (once and after in _STAMPS):
            _STAMPS[after] = time.perf_counter()
        return out
    return wrapper


def _host_detail() -> list[tuple]:
    """(owner, attribute, stamp name) of --host-detail: classes' methods and modules' functions,
    each looked up where its caller finds it."""
    from cluster import llm_engine
    from scheduler.block_manager import BlockManager
    from scheduler.scheduler import Scheduler
    from workers import cuda_graphs
    from workers.input_batch import InputBatch
    from workers.pinned_staging import PinnedStaging

    return [(llm_engine, "check_and_pack_token_ids", "check"), (Scheduler, "schedule", "schedule"),
            (BlockManager, "get_computed_blocks", "trie"), (InputBatch, "update", "update"),
            (InputBatch, "prepare", "prepare"), (cuda_graphs, "as_decode_rows", "decode_rows"),
            (cuda_graphs, "query_row_groups", "row_groups"), (PinnedStaging, "copy_region", "copy"),
            (llm_engine.LLMEngine, "_build_tracked", "build"), (Scheduler, "update_from_output", "update_output"),
            (llm_engine.LLMEngine, "_apply", "apply")]


@contextlib.contextmanager
def _stamping(host_detail: bool = False):
    """The worker's step methods (and with host_detail, _host_detail's) stamp _STAMPS while
    inside; the originals come back after."""
    wrapped = [(mr.ModelRunner, "launch", "launch0", "launch1", False),
               (mr.ModelRunner, "_forward", "forward0", "forward1", False),
               (mr.ModelRunner, "_sample", "sample0", "sample1", False),
               # the graph's launch alone: in a request it has looked far slower than replayed alone
               (torch.cuda.CUDAGraph, "replay", "replay0", "replay1", False),
               # result() is called again once collected: the first call is the wait
               (mr.StepHandle, "result", "wait0", "tokens", True)]
    if host_detail:
        wrapped += [(owner, name, f"{stamp}0", f"{stamp}1", True) for owner, name, stamp in _host_detail()]
    originals = [(cls, name, getattr(cls, name)) for cls, name, *_ in wrapped]
    for cls, name, before, after, once in wrapped:
        setattr(cls, name, _stamped(getattr(cls, name), before, after, once))
    try:
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def _probe_graph(graph) -> dict:
    rows = []
    for _ in range(12):
        sync_device()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        graph.replay()
        end.record()
        t1 = time.perf_counter()
        sync_device()
        rows.append((1e3 * (t1 - t0), start.elapsed_time(end)))
    return {"launch_host_ms": statistics.median(r[0] for r in rows[2:]),
            "device_span_ms": statistics.median(r[1] for r in rows[2:])}


def _graph_kernels(graph, replays: int = 5) -> dict:
    """Each kernel of one replay, by name: count and microseconds (torch.profiler over replays)."""
    graph.replay()
    sync_device()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync_device()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list] = {}
    for e in events:
        entry = per_kernel.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.end - e.time_range.start
    return {"busy_us": sum(us for _, us in per_kernel.values()) / replays,
            "kernels": {name: {"count": n // replays, "us_each": round(us / n, 2)}
                        for name, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kernels", action="store_true", help="also each probed graph's kernels (torch.profiler)")
    p.add_argument("--host-detail", action="store_true", help="also stamp the host's path function by function")
    args = p.parse_args(argv)

    from cluster.llm import LLM
    from scheduler.sampling_params import SamplingParams

    llm = LLM(args.model, load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=256,
              max_num_batched_tokens=16384, enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    samples = {"cold": [], "warm": []}
    with _stamping(args.host_detail):
        for k in range(args.requests):
            prefix = [(17 * j + 13 * k) % 9000 + 1 for j in range(args.prefix_len)]
            for name, suffix in (("cold", [11, 12, 13, 14]), ("warm", [21, 22, 23, 24])):
                sync_device()
                _STAMPS.clear()
                t0 = time.perf_counter()
                out = llm.generate([prefix + suffix], params, use_tqdm=False)[0]
                stamps = {key: 1e3 * (t - t0) for key, t in _STAMPS.items()}
                stamps["total"] = 1e3 * (time.perf_counter() - t0)
                assert (out.metrics.num_cached_tokens == 0) == (name == "cold"), "the cache served the wrong one"
                if k >= 2:
                    samples[name].append(stamps)
    for name, rows in samples.items():
        medians = {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}
        print(json.dumps({"bench": "request_phases", "request": name, "prefix_len": args.prefix_len, **medians}))
    runner = llm.engine.worker.runner
    if runner.prefill_graphs is None:
        llm.shutdown()
        return
    # the graphs the last requests replayed, whose buffers still hold their steps: the warm hit's
    # 4 tokens ran as decode rows (cuda_graphs.MAX_QUERY_ROWS), the cold prompt as a prefill
    cold_size = next(t for t in runner.prefill_graphs.sizes if t >= args.prefix_len + 4)
    decode = runner.decode_graphs
    for label, graph, size in (("decode rows (warm)", decode.query_graphs.get(4, decode.graphs[4]), 4),
                               ("prefill (cold)", runner.prefill_graphs.graphs[cold_size], cold_size),
                               ("decode", decode.graphs[1], 1)):
        row = {"bench": "graph_replay", "graphs": label, "size": size, **_probe_graph(graph)}
        if args.kernels:
            row.update(_graph_kernels(graph))
        print(json.dumps(row))
    llm.shutdown()


if __name__ == "__main__":
    main()
