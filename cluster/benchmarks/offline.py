"""Offline benchmarks (issue: GPU fast path, item 4 a/b/c/e). Each prints one JSON line per result
and appends it to --out/results.jsonl; plots of everything in that file (throughput.png,
latency.png, prefix_cache.png) are written beside it when matplotlib is installed.

  python -m cluster.benchmarks.offline throughput --model Qwen/Qwen3-0.6B --load-format dummy
  python -m cluster.benchmarks.offline hf          # transformers on the same workload and GPU
  python -m cluster.benchmarks.offline latency     # batch 1 (128 in, 512 out), then batches 8, 32, 128
  python -m cluster.benchmarks.offline prefix      # TTFT with a shared 2k-token prefix, cold and warm

--use-ray runs the same engine through the SchedulerActor and WorkerActors (the served path), so
`throughput` and `latency` with and without it give the Ray path's throughput ratio and the time
it adds per decode step; --data-parallel-size 2 against 1 gives data-parallel scaling.
"""
import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from cluster.benchmarks.plots import write_plots
from cluster.benchmarks.workloads import fixed_workload, nano_vllm_workload


def sync_device() -> None:
    """Wait for the GPU, where there is one: the timers around a request start and stop on it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _emit(args, result: dict) -> None:
    on_ray = args.use_ray or args.data_parallel_size > 1 or args.tensor_parallel_size > 1
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "dp": args.data_parallel_size, "tp": args.tensor_parallel_size,
              "async_scheduling": not args.no_async_scheduling, "path": "ray" if on_ray else "in-process",
              "num_scheduler_steps": args.num_scheduler_steps, **result}
    print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def _make_llm(args, **overrides):
    from cluster.llm import LLM

    kwargs = dict(load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                  attention_backend=args.attention_backend, data_parallel_size=args.data_parallel_size,
                  tensor_parallel_size=args.tensor_parallel_size, use_ray=args.use_ray or None,
                  async_scheduling=not args.no_async_scheduling, num_scheduler_steps=args.num_scheduler_steps)
    kwargs.update(overrides)
    return LLM(args.model, **kwargs)


def _params(max_tokens: int):
    from scheduler.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _warm_up(llm, args) -> None:
    """Compile kernels on every replica before timing (requests spread by load): small steps replay
    CUDA graphs, but a step over the graphs' 2048 tokens runs eagerly, and Triton compiles a kernel
    again for integer arguments it specialises differently (an H200 run's batch-32 TTFT took 1.2 s
    instead of 40 ms when only small prompts had warmed up)."""
    small = [[1 + i] * (3 + 40 * i) for i in range(2 * args.data_parallel_size)]
    llm.generate(small, _params(8), use_tqdm=False)
    large = [[7 + i] * 1100 for i in range(2 * args.data_parallel_size)]
    llm.generate(large, _params(2), use_tqdm=False)


def _trace_steps(llm) -> dict[int, dict]:
    """Record each step of the in-process engine's one replica: its shape when scheduled, and when
    its output was collected. In a device-bound loop the gap between two collections is one step's
    device time."""
    scheduler = llm.engine.core.replicas[0].scheduler
    steps: dict[int, dict] = {}  # step_id -> record, in schedule order
    schedule, update = scheduler.schedule, scheduler.update_from_output

    def traced_schedule():
        out = schedule()
        n = out.num_scheduled_tokens
        # a multi-step's sequences have several tokens each, all decodes: one per pass
        steps[out.step_id] = {"tokens": out.total_num_scheduled_tokens, "seqs": len(n),
                              "prefill": out.decode_steps == 1 and any(k > 1 for k in n.values()),
                              "passes": out.decode_steps,
                              "context": sum(scheduler.seqs[s].num_computed_tokens for s in n if s in scheduler.seqs)}
        return out

    def traced_update(step, result):
        steps[step.step_id]["done"] = time.perf_counter()
        return update(step, result)

    scheduler.schedule, scheduler.update_from_output = traced_schedule, traced_update
    if torch.cuda.is_available():
        _trace_device_spans(llm.engine.worker.runner, steps)
    return steps


def _trace_device_spans(runner, steps: dict[int, dict]) -> None:
    """CUDA events around each launch: on the device's clock, a step's span runs from the moment
    the device could start it (after the step before, or once the host enqueued it) to its last
    kernel, and a gap before a span is time the device sat idle waiting for the host."""
    launch = runner.launch

    def traced_launch(step):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        begin.record()
        handle = launch(step)
        end.record()
        if step.step_id in steps:
            steps[step.step_id].update(begin=begin, end=end, launch_s=time.perf_counter() - t0)
        return handle

    runner.launch = traced_launch


def _summarise_trace(llm, steps: dict[int, dict], start: float) -> dict:
    """Where the time went: prefill-bearing steps against decode-only ones, and the decode steps'
    achieved bytes per second over the KV they read plus the weights."""
    runner = llm.engine.worker.runner
    cfg = runner.hf_config
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * runner.dtype.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    out = {"prefill_steps": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_s": 0.0, "decode_bytes": 0}
    last = start
    for s in (s for s in steps.values() if "done" in s and s["done"] > start):
        kind = "prefill" if s["prefill"] else "decode"
        out[f"{kind}_steps"] += 1
        out[f"{kind}_s"] += s["done"] - last
        if kind == "decode":
            out["decode_bytes"] += s["passes"] * (s["context"] * kv_bytes_per_token + weight_bytes)
        last = s["done"]
    out["decode_GBps"] = out["decode_bytes"] / max(out["decode_s"], 1e-9) / 1e9
    timed = [s for s in steps.values() if "end" in s and s.get("done", 0) > start]
    if timed:
        out["device_idle"] = _device_idle_by_batch(timed)
    return out


def _device_idle_by_batch(timed: list[dict]) -> dict:
    """Per kind of step (prefill, or decode by batch size): device span, device idle before it,
    and host time inside launch, in seconds. Idle where the host is slower than the device."""
    torch.cuda.synchronize()
    buckets: dict[str, dict] = {}
    prev_end = None
    for s in timed:
        name = "prefill" if s["prefill"] else next(f"decode<={b}" for b in (8, 32, 64, 128, 256, 1 << 30)
                                                   if s["seqs"] <= b)
        b = buckets.setdefault(name, {"steps": 0, "span_s": 0.0, "idle_s": 0.0, "launch_s": 0.0})
        b["steps"] += 1
        b["span_s"] += s["begin"].elapsed_time(s["end"]) / 1e3
        b["idle_s"] += max(0.0, prev_end.elapsed_time(s["begin"]) / 1e3) if prev_end is not None else 0.0
        b["launch_s"] += s["launch_s"]
        prev_end = s["end"]
    return {k: {m: round(v, 4) for m, v in b.items()} for k, b in buckets.items()}


def _device_profile(enabled: bool):
    """torch.profiler over the timed run, device activity only (recording every host op would
    slow the host, the very thing being measured)."""
    if not enabled:
        return contextlib.nullcontext()
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-profile needs CUDA")
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])


def _summarise_device_profile(prof, elapsed: float, top: int = 20) -> dict:
    """How long the GPU was busy in the run (kernels and copies, overlaps not merged), and the
    kernels that took most of it."""
    events = prof.key_averages()

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy_s = sum(device_us(e) for e in events) / 1e6
    for e in sorted(events, key=device_us, reverse=True)[:top]:
        print(f"  {device_us(e) / 1e3:10.1f} ms  {e.count:8d} x  {e.key[:90]}", flush=True)
    return {"gpu_busy_s": busy_s, "gpu_busy_fraction": busy_s / elapsed}


def bench_throughput(args) -> None:
    work = nano_vllm_workload(args.num_requests, seed=args.seed)
    llm = _make_llm(args)
    _warm_up(llm, args)
    steps = _trace_steps(llm) if args.trace else None
    params = [_params(n) for n in work.output_lens]
    sync_device()
    with _device_profile(args.gpu_profile) as prof:
        start = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        sync_device()
        elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(work.output_lens), "every request must produce exactly its output length"
    trace = _summarise_trace(llm, steps, start) if steps is not None else {}
    if args.gpu_profile:
        trace.update(_summarise_device_profile(prof, elapsed))
    _emit(args, {"bench": "throughput", "engine": "folovllm", "num_requests": len(outs), "output_tokens": num_out,
                 "seconds": elapsed, "output_tok_per_s": num_out / elapsed,
                 "total_tok_per_s": (num_out + sum(map(len, work.prompts))) / elapsed, **trace})


def bench_hf(args) -> None:
    """transformers on the same workload. generate_batch (continuous batching) takes one
    max_new_tokens for all requests, so it gets the workload's mean output length; batched
    generate runs length-sorted batches of --hf-batch and counts only the requested tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from cluster.model_info import resolve
    from cluster.config import EngineConfig

    work = nano_vllm_workload(args.num_requests, seed=args.seed)
    hf_config = resolve(EngineConfig.from_flat(model=args.model)).hf_config
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    for mode in args.hf_modes.split(","):
        sync_device()
        start = time.perf_counter()
        if mode == "generate_batch":
            mean_out = sum(work.output_lens) // len(work.output_lens)
            gen = GenerationConfig(max_new_tokens=mean_out, do_sample=False, eos_token_id=None, pad_token_id=0)
            model.generate_batch(work.prompts, generation_config=gen)
            num_out = mean_out * len(work.prompts)
        else:
            num_out = _hf_batched_generate(model, work, args.hf_batch)
        sync_device()
        elapsed = time.perf_counter() - start
        _emit(args, {"bench": "throughput", "engine": f"hf-{mode}", "num_requests": len(work.prompts),
                     "output_tokens": num_out, "seconds": elapsed, "output_tok_per_s": num_out / elapsed})


def _hf_batched_generate(model, work, batch_size: int) -> int:
    from transformers import GenerationConfig

    order = sorted(range(len(work.prompts)), key=lambda i: work.output_lens[i])
    device = next(model.parameters()).device
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        width = max(len(work.prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding, as decoder-only generation needs
            ids[row, width - len(work.prompts[i]):] = torch.tensor(work.prompts[i])
            mask[row, width - len(work.prompts[i]):] = 1
        gen = GenerationConfig(max_new_tokens=max(work.output_lens[i] for i in idx), do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    return sum(work.output_lens)


def bench_latency(args) -> None:
    llm = _make_llm(args)
    _warm_up(llm, args)
    for batch in [1] + [int(b) for b in args.batches.split(",")]:
        work = fixed_workload(batch, 128, 512, seed=batch)
        sync_device()
        start = time.perf_counter()
        outs = llm.generate(work.prompts, _params(512), use_tqdm=False)
        sync_device()
        elapsed = time.perf_counter() - start
        ttft = [o.metrics.time_to_first_token for o in outs]
        decode = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
                  for o in outs]
        _emit(args, {"bench": "latency", "batch": batch, "prompt_len": 128, "output_len": 512,
                     "seconds": elapsed, "mean_ttft_ms": 1e3 * sum(ttft) / batch,
                     "mean_tpot_ms": 1e3 * sum(decode) / batch, "output_tok_per_s": batch * 512 / elapsed})


def bench_prefix(args) -> None:
    """Cold: the first request with a new prefix; warm: the next one, with another suffix. Each
    is a single one-step request, so one sample is noisy: --repeats prefixes, medians reported."""
    llm = _make_llm(args, enable_prefix_caching=True)
    llm.generate([[1, 2, 3]], _params(8), use_tqdm=False)
    prefixes = fixed_workload(args.repeats + 1, args.prefix_len, 1, seed=7).prompts
    samples = {"cold": [], "warm": []}
    for i, prefix in enumerate(prefixes):
        for name, suffix in [("cold", [11, 12, 13, 14]), ("warm", [21, 22, 23, 24])]:
            sync_device()
            start = time.perf_counter()
            out = llm.generate([prefix + suffix], _params(1), use_tqdm=False)[0]
            sync_device()
            ms = 1e3 * (time.perf_counter() - start)
            cached = out.metrics.num_cached_tokens
            assert (cached == 0) == (name == "cold"), f"{name} request: {cached} tokens from the cache"
            if i > 0:  # the first prefix warms up the step shapes both requests take
                samples[name].append(ms)
    cold, warm = statistics.median(samples["cold"]), statistics.median(samples["warm"])
    _emit(args, {"bench": "prefix_cache", "prefix_len": args.prefix_len, "repeats": args.repeats,
                 "cold_ttft_ms": cold, "warm_ttft_ms": warm, "speedup": cold / warm,
                 "cold_samples_ms": samples["cold"], "warm_samples_ms": samples["warm"]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="folovllm bench offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["throughput", "hf", "latency", "prefix"])
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--use-ray", action="store_true", help="Ray actors even for one replica (the served path)")
    p.add_argument("--no-async-scheduling", action="store_true", help="Ray path: collect each step before the next")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode passes per scheduled step (multi-step; for host-bound data parallel runs)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--trace", action="store_true",
                   help="throughput, in-process: split the time between prefill and decode steps")
    p.add_argument("--gpu-profile", action="store_true",
                   help="throughput, in-process, CUDA: the GPU's busy time in the run and its top kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5, help="prefix: prefixes timed, cold and warm each")
    p.add_argument("--hf-modes", default="generate,generate_batch",
                   help="generate first: generate_batch did not finish in 170 s on an H100 (run 1)")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    {"throughput": bench_throughput, "hf": bench_hf, "latency": bench_latency, "prefix": bench_prefix}[args.bench](args)
    for path in write_plots(args.out):
        print(f"plot: {path}", flush=True)


if __name__ == "__main__":
    main()
