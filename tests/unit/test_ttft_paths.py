"""ttft_paths through the in-process engine (tiny model, CPU): one row, its fields, the warm-up left out.
Its grpc path runs against a real server in tests/integration/test_serve_bench.py."""
import json

from cluster.benchmarks import ttft_paths


def test_inproc_reports_the_requests_after_the_warmup(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("FOLOVLLM_ENGINE_LINK", raising=False)
    ttft_paths.main(["inproc", "--model", str(tiny_model_dir), "--load-format", "auto", "--device", "cpu",
                     "--requests", "3", "--warmup", "2", "--prompt-len", "24", "--max-model-len", "256",
                     "--max-num-batched-tokens", "256", "--max-num-seqs", "8"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert (row["path"], row["what"], row["prompt_len"], row["requests"], row["engine_link"]) == (
        "inproc", "max_tokens=1", 24, 3, "1")
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]


def test_prompts_are_fresh_and_seeded():
    a, b = ttft_paths.fresh_prompts(4, 16, "x"), ttft_paths.fresh_prompts(4, 16, "x")
    assert a == b and len({tuple(p) for p in a}) == 4 and all(len(p) == 16 for p in a)
