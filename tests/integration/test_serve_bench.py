"""`folovllm bench serve`: the metrics math on synthetic timings and a fake client, then the whole
command against a real `folovllm serve` of the tiny model (loopback only)."""
import asyncio
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cluster.benchmarks.serve_bench import (RequestResult, parse_slos, random_prompts, request_timings, run_rate,
                                            send_times, summarize)
from tests.integration.helpers import REPO_ROOT, start_cli_server, stop_cli_server

METRICS = ("ttft", "tpot", "itl", "e2el")


# ---- metrics math, no server ----

def test_request_timings_skip_empty_deltas_and_spread_multi_token_ones():
    ttft, itl, n = request_timings([(0.5, 0), (1.0, 1), (1.2, 3), (1.5, 1), (1.6, 0)])
    assert ttft == 1.0 and n == 5
    assert itl == pytest.approx([0.2, 0.0, 0.0, 0.3])  # output tokens - 1 gaps, summing to 1.5 - 1.0
    ttft, itl, n = request_timings([(0.4, 2), (0.7, 1)])  # tokens after the first in the first delta: 0 gaps
    assert (ttft, n) == (0.4, 3) and itl == pytest.approx([0.0, 0.3])


def _done(ttft: float, e2el: float, itl: list[float], prompt_len: int = 10) -> RequestResult:
    return RequestResult(prompt_len, success=True, error=None, ttft=ttft, e2el=e2el, itl=itl,
                         output_tokens=len(itl) + 1)


def test_summarize_matches_hand_computed_values():
    results = [_done(0.1, 0.5, [0.1, 0.1, 0.2]),   # TPOT (0.5 - 0.1) / 3 = 133 ms: misses tpot:100
               _done(0.2, 0.4, [0.05, 0.05, 0.1]),  # TPOT 66.7 ms: good
               _done(3.0, 3.2, [0.1, 0.1]),          # TTFT 3 s: misses ttft:2000
               RequestResult(10, error="UNAVAILABLE: x")]
    row = summarize(results, 4.0, [50, 90, 99], {"ttft": 2000, "tpot": 100})
    assert (row["completed"], row["failed"]) == (3, 1)
    assert row["errors"] == {"UNAVAILABLE: x": 1}
    assert row["total_input_tokens"] == 30 and row["total_output_tokens"] == 4 + 4 + 3
    assert row["request_throughput"] == pytest.approx(3 / 4)
    assert row["request_goodput"] == pytest.approx(1 / 4)
    assert row["output_throughput"] == pytest.approx(11 / 4)
    assert row["total_token_throughput"] == pytest.approx(41 / 4)
    assert row["mean_ttft_ms"] == pytest.approx(1100) and row["median_ttft_ms"] == pytest.approx(200)
    assert row["mean_tpot_ms"] == pytest.approx(1e3 * (0.4 / 3 + 0.2 / 3 + 0.2 / 2) / 3)
    assert row["num_itl"] == 8 and row["mean_itl_ms"] == pytest.approx(1e3 * 0.8 / 8)
    assert row["p99_e2el_ms"] == pytest.approx(1e3 * (0.5 + 0.98 * (3.2 - 0.5)))  # numpy's linear interpolation
    for m in METRICS:
        assert row[f"p50_{m}_ms"] == row[f"median_{m}_ms"] <= row[f"p90_{m}_ms"] <= row[f"p99_{m}_ms"]
    assert summarize([RequestResult(5)], 1.0, [99], {})["mean_ttft_ms"] == 0.0  # nothing completed: zeros
    assert parse_slos(["ttft:2000", "e2el:5000"]) == {"ttft": 2000.0, "e2el": 5000.0}
    with pytest.raises(Exception, match="NAME:MS"):
        parse_slos(["itl:5"])


def test_workload_is_seeded_exact_and_poisson():
    prompts = random_prompts(4, 32, "0:0:prompts")
    assert prompts == random_prompts(4, 32, "0:0:prompts") != random_prompts(4, 32, "0:1:prompts")
    assert all(len(p) == 32 and 0 <= min(p) and max(p) < 10000 for p in prompts)
    assert send_times(3, float("inf"), 1.0, "s") == [0.0, 0.0, 0.0]
    times = send_times(20000, 4.0, 1.0, "s")
    assert times[0] == 0.0 and times == sorted(times) and times == send_times(20000, 4.0, 1.0, "s")
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(0.25, rel=0.03)
    assert sum((g - mean) ** 2 for g in gaps) / len(gaps) == pytest.approx(0.25 ** 2, rel=0.06)  # exponential
    bursty = send_times(20000, 4.0, 0.5, "s")
    assert bursty[-1] / len(bursty) == pytest.approx(0.25, rel=0.05)


class FakeClient:
    """Streams `num_tokens` one-token deltas `step_s` apart; counts streams open at once."""

    def __init__(self, num_tokens: int, step_s: float):
        self.num_tokens, self.step_s, self.open, self.max_open = num_tokens, step_s, 0, 0

    async def generate_stream(self, prompt, params):
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for _ in range(self.num_tokens):
                await asyncio.sleep(self.step_s)
                yield SimpleNamespace(token_ids=[1])
        finally:
            self.open -= 1


def test_run_rate_caps_concurrency_and_bounds_time():
    client = FakeClient(num_tokens=3, step_s=0.01)
    results, duration = asyncio.run(run_rate(client, [[1]] * 6, [0.0] * 6, None, 2, timeout_s=10))
    assert client.max_open == 2 and all(r.success and r.output_tokens == 3 for r in results)
    assert all(len(r.itl) == 2 and r.ttft <= r.e2el for r in results)
    assert 0.08 <= duration < 2  # 3 waves of 2 requests of 3 steps

    client = FakeClient(num_tokens=1000, step_s=0.01)
    start = time.perf_counter()
    results, duration = asyncio.run(run_rate(client, [[1]] * 3, [0.0, 0.0, 60.0], None, None, timeout_s=0.2))
    assert time.perf_counter() - start < 2 and duration < 1 and client.open == 0  # streams cancelled
    assert [r.error for r in results] == ["timed out (--timeout-s)"] * 2 + ["not sent within --timeout-s"]
    assert summarize(results, duration, [99], {})["failed"] == 3


# ---- against a real server ----

@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, target = start_cli_server(tiny_model_dir)
    yield target
    stop_cli_server(proc)


@pytest.mark.slow
def test_bench_serve_against_a_real_server(server, tmp_path):
    num_prompts, input_len, output_len = 6, 32, 8
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "serve", "--server", server, "--num-prompts", str(num_prompts),
         "--input-len", str(input_len), "--output-len", str(output_len), "--request-rates", "4,inf",
         "--timeout-s", "60", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows == [json.loads(line) for line in (tmp_path / "serve_results.jsonl").read_text().splitlines()]
    assert [r["request_rate"] for r in rows] == [4.0, "inf"]
    assert "Serving benchmark" in out.stdout  # the table
    for r in rows:
        assert (r["completed"], r["failed"], r["errors"]) == (num_prompts, 0, {}), r
        assert r["total_output_tokens"] == num_prompts * output_len
        assert r["total_input_tokens"] == num_prompts * input_len
        assert r["num_itl"] == num_prompts * (output_len - 1)
        assert r["output_throughput"] == pytest.approx(num_prompts * output_len / r["duration_s"])
        assert 0 <= r["request_goodput"] <= r["request_throughput"]
        for stat in ("mean", "median", "p50", "p90", "p99"):
            assert 0 < r[f"{stat}_ttft_ms"] <= r[f"{stat}_e2el_ms"]
        for m in METRICS:
            assert 0 <= r[f"p50_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"]
        # each request's ITLs sum to (last token - TTFT) <= (E2EL - TTFT) = TPOT * (output_len - 1)
        assert r["mean_itl_ms"] * r["num_itl"] <= r["mean_tpot_ms"] * num_prompts * (output_len - 1) + 1e-6


@pytest.mark.slow
def test_ttft_paths_against_a_real_server(server):
    """cluster.benchmarks.ttft_paths grpc: two rows (max_tokens 1 and 16), each over its requests
    after the warm-up, the server's first token timed."""
    out = subprocess.run(
        [sys.executable, "-m", "cluster.benchmarks.ttft_paths", "grpc", "--server", server, "--requests", "3",
         "--warmup", "1", "--prompt-len", "20"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["path"], r["what"], r["requests"], r["prompt_len"]) for r in rows] == [
        ("grpc", "first of max_tokens=1", 3, 20), ("grpc", "first of max_tokens=16", 3, 20)]
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
