"""Online serving benchmark (issue: GPU fast path, item 4f), reported the way `vllm bench serve` does.

    folovllm serve --model Qwen/Qwen3-0.6B --load-format dummy            # one terminal
    folovllm bench serve --server 127.0.0.1:50051 --request-rates 1,2,4,8,inf

For each request rate, --num-prompts requests of --input-len random token ids (so lengths are exact)
and --output-len output tokens (greedy, ignore_eos) are sent over one gRPC channel with Poisson
arrivals (exponential inter-arrival times; --burstiness other than 1 gives gamma ones, as vLLM's
does); rate inf sends them all at once. Each rate gets its own prompts, so the server's prefix cache
cannot serve one rate's prompts to the next. One JSON line per rate is printed and appended to
--out/serve_results.jsonl, a table follows at the end, and --out/serve_bench.png when matplotlib
is there.

Per request, times are taken on the client from the moment the request is sent (after any
--max-concurrency wait, as vLLM does):
  TTFT  arrival of the first delta that carries tokens
  E2EL  end of the stream
  TPOT  (E2EL - TTFT) / (output tokens - 1); 0 for one-token outputs when judging goodput
  ITL   the gaps between token-bearing deltas, one per output token after the first: a delta of
        k tokens adds one gap (since the previous delta) and k - 1 gaps of 0, so a request always
        gives output tokens - 1 ITLs summing to its last token's time minus TTFT. (vLLM's own
        client appends one gap per streamed chunk; with one token per delta, as our decode steps
        send, the two agree.)
Goodput: completed requests per second meeting every --goodput SLO (ttft, tpot, e2el in ms).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str | None = "not sent within --timeout-s"
    ttft: float = 0.0  # seconds, send -> first token-bearing delta
    e2el: float = 0.0  # seconds, send -> end of stream
    itl: list[float] = field(default_factory=list)  # seconds; output_tokens - 1 of them
    output_tokens: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def request_timings(deltas: list[tuple[float, int]]) -> tuple[float, list[float], int]:
    """(ttft, itl, output tokens) from (seconds since send, number of tokens) per delta; deltas
    with no tokens are skipped, a delta of k tokens adds one gap and k - 1 zero gaps."""
    ttft, itl, num_tokens, last = 0.0, [], 0, None
    for t, k in deltas:
        if k == 0:
            continue
        if last is None:
            ttft = t
        else:
            itl.append(t - last)
        itl.extend([0.0] * (k - 1))
        last, num_tokens = t, num_tokens + k
    return ttft, itl, num_tokens


def random_prompts(num_prompts: int, input_len: int, seed: str, vocab: int = 10000) -> list[list[int]]:
    rng = random.Random(seed)  # str seeds are hashed deterministically (not by PYTHONHASHSEED)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_prompts)]


def send_times(num_prompts: int, rate: float, burstiness: float, seed: str) -> list[float]:
    """Seconds from the start at which each request is sent; the first goes at once."""
    if math.isinf(rate):
        return [0.0] * num_prompts
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(num_prompts):
        times.append(t)
        t += rng.expovariate(rate) if burstiness == 1 else rng.gammavariate(burstiness, 1 / (rate * burstiness))
    return times


def parse_slos(items: list[str]) -> dict[str, float]:
    """["ttft:2000", "tpot:100"] -> {"ttft": 2000.0, "tpot": 100.0} (milliseconds)."""
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in SLO_METRICS or not ms:
            raise argparse.ArgumentTypeError(f"--goodput takes NAME:MS with NAME in {SLO_METRICS}, got {item!r}")
        slos[name] = float(ms)
    return slos


def _pct_key(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


def summarize(results: list[RequestResult], duration: float, percentiles: list[float],
              slos: dict[str, float]) -> dict:
    """vLLM's serving metrics over one rate's requests; times in ms, throughputs per second."""
    done = [r for r in results if r.success]
    duration = max(duration, 1e-9)
    num_out = sum(r.output_tokens for r in done)
    num_in = sum(r.prompt_len for r in done)
    num_good = sum(all(getattr(r, m) * 1e3 <= ms for m, ms in slos.items()) for r in done)
    row = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
           "total_input_tokens": num_in, "total_output_tokens": num_out,
           "request_throughput": len(done) / duration, "request_goodput": num_good / duration,
           "output_throughput": num_out / duration, "total_token_throughput": (num_in + num_out) / duration}
    values = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.output_tokens > 1],
              "itl": [gap for r in done for gap in r.itl], "e2el": [r.e2el for r in done]}
    for name in METRICS:
        ms = np.asarray(values[name] or [0.0]) * 1e3
        row[f"mean_{name}_ms"] = float(ms.mean())
        row[f"median_{name}_ms"] = float(np.median(ms))
        row[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            row[f"p{_pct_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    row["num_itl"] = len(values["itl"])
    row["errors"] = dict(Counter(r.error for r in results if not r.success).most_common(5))
    return row


async def send(client, prompt: list[int], params, result: RequestResult) -> None:
    start = time.perf_counter()
    result.error = "timed out (--timeout-s)"  # stays so if the rate's time runs out mid-stream
    deltas = []
    try:
        async for delta in client.generate_stream(prompt, params):
            deltas.append((time.perf_counter() - start, len(delta.token_ids)))
    except Exception as e:  # noqa: BLE001 - a failed request is a result, as in vLLM
        result.error = f"{type(e).__name__}: {e}"
        return
    result.e2el = time.perf_counter() - start
    result.ttft, result.itl, result.output_tokens = request_timings(deltas)
    result.success = result.output_tokens > 0
    result.error = None if result.success else "no output tokens"


async def run_rate(client, prompts: list[list[int]], times: list[float], params, max_concurrency: int | None,
                   timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send prompts[i] at times[i]; (results, seconds until the last finished or the time ran out)."""
    results = [RequestResult(len(p)) for p in prompts]
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        async with limit:
            await send(client, prompts[i], params, results[i])

    async def dispatch() -> None:
        for i, t in enumerate(times):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)

    start = time.perf_counter()
    try:
        await asyncio.wait_for(dispatch(), timeout_s)
    except TimeoutError:
        pass
    duration = time.perf_counter() - start
    for task in tasks:  # cancelling a stream aborts its request on the server
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return results, duration


def _rate_label(rate: float):
    return "inf" if math.isinf(rate) else rate


def _emit(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


async def bench(args) -> list[dict]:
    from cluster.client import AsyncClient
    from scheduler.sampling_params import SamplingParams

    rates = [float(r) for r in args.request_rates.split(",")]
    if not rates or min(rates) <= 0 or args.num_prompts < 1:
        raise ValueError("--request-rates must be positive and --num-prompts at least 1")
    percentiles = [float(p) for p in args.percentiles.split(",")]
    slos = parse_slos(args.goodput)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    out, rows = Path(args.out), []
    async with AsyncClient(args.server, auth_token=args.auth_token, root_certificates=args.tls_ca) as client:
        info, _ = await client.model_info(timeout=60)
        if args.input_len + args.output_len > info.max_model_len:
            raise ValueError(f"--input-len + --output-len = {args.input_len + args.output_len} is over the "
                             f"server's max_model_len {info.max_model_len}")
        warmup = random_prompts(1, args.input_len, f"{args.seed}:warmup")[0]
        await client.generate(warmup, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                              timeout=args.timeout_s)
        for i, rate in enumerate(rates):
            prompts = random_prompts(args.num_prompts, args.input_len, f"{args.seed}:{i}:prompts")
            times = send_times(args.num_prompts, rate, args.burstiness, f"{args.seed}:{i}:arrivals")
            results, duration = await run_rate(client, prompts, times, params, args.max_concurrency, args.timeout_s)
            row = {"bench": "serve", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": args.label,
                   "server": args.server, "model": info.model, "request_rate": _rate_label(rate),
                   "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                   "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                   "seed": args.seed, "goodput_slo_ms": slos, **summarize(results, duration, percentiles, slos)}
            _emit(out, row)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("rate", "request_rate", "{}"), ("ok", "completed", "{}"), ("fail", "failed", "{}"),
            ("req/s", "request_throughput", "{:.2f}"), ("good/s", "request_goodput", "{:.2f}"),
            ("out tok/s", "output_throughput", "{:.0f}"), ("tot tok/s", "total_token_throughput", "{:.0f}")]
    for m in METRICS:
        cols += [(f"{m} p50", f"median_{m}_ms", "{:.1f}"), (f"{m} p99", f"p99_{m}_ms", "{:.1f}")]
    cells = [[name for name, _, _ in cols]] + [
        [fmt.format(row[key]) if key in row else "-" for _, key, fmt in cols] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cols))]
    print("\nServing benchmark (times in ms)")
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, m in zip(axes, ("ttft", "tpot")):
        for p, key in (("p50", f"median_{m}_ms"), ("p99", f"p99_{m}_ms")):
            if all(key in r for r in rows):
                ax.plot(x, [r[key] for r in rows], marker="o", label=p)
        ax.set_xticks(list(x), [str(r["request_rate"]) for r in rows])
        ax.set(title=m.upper(), xlabel="request rate (req/s)", ylabel="ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--server", required=True, help="host:port of a running `folovllm serve`")
    g.add_argument("--auth-token", help="bearer token, when the server asks for one")
    g.add_argument("--tls-ca", help="PEM root certificate to verify the server with (turns TLS on)")
    g = p.add_argument_group("workload")
    g.add_argument("--request-rates", default="1,2,4,8,inf", help="requests/s, comma-separated; inf: all at once")
    g.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    g.add_argument("--input-len", type=int, default=1024, help="prompt tokens (random ids below 10000)")
    g.add_argument("--output-len", type=int, default=128, help="output tokens (greedy, ignore_eos)")
    g.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1 burstier, >1 more uniform")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout-s", type=float, default=600.0, help="time limit per rate; the rest count as failed")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="*", default=["ttft:2000", "tpot:100"], metavar="NAME:MS",
                   help="SLOs of goodput; NAME in ttft, tpot, e2el")
    g.add_argument("--percentiles", default="50,90,99", help="percentiles reported, comma-separated")
    g.add_argument("--label", default="", help="free text stored in each result, e.g. the server's card")
    g.add_argument("--out", default="bench_out", help="directory of serve_results.jsonl and serve_bench.png")


def run(args) -> int:
    from cluster.client import FolovllmError

    try:
        parse_slos(args.goodput)
        rows = asyncio.run(bench(args))
    except (FolovllmError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"folovllm bench serve: error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    if plot(rows, Path(args.out) / "serve_bench.png"):
        print(f"plot: {Path(args.out) / 'serve_bench.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="folovllm bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
