"""`folovllm serve` end to end: embedded Ray, the engine's actors and the gRPC frontend in one
process, driven by the Python client and the CLI the way an operator would (loopback only)."""
import signal
import subprocess
import sys
import time

import pytest

from cluster.client import Client, DeadlineExceeded, FolovllmError
from scheduler.sampling_params import SamplingParams
from tests.integration.helpers import REPO_ROOT, start_cli_server, stop_cli_server

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = ["The capital of France is", "你好，世界", "def f(x):"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, target = start_cli_server(tiny_model_dir)
    yield proc, target
    stop_cli_server(proc)


def test_streamed_output_equals_offline_output(server, tiny_model_dir):
    from cluster.llm import LLM

    _, target = server
    offline = LLM(str(tiny_model_dir), device="cpu", max_model_len=256, num_gpu_blocks=256)
    expected = [o.outputs[0] for o in offline.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with Client(target, timeout=60) as client:
        for prompt, want in zip(PROMPTS, expected):
            deltas = list(client.generate_stream(prompt, GREEDY))
            assert [t for d in deltas for t in d.token_ids] == want.token_ids
            assert "".join(d.text for d in deltas) == want.text
            assert deltas[-1].finish_reason == "length"


def test_cli_generate_and_status_against_the_server(server):
    _, target = server
    out = cli("generate", "The capital of France is", "--server", target, "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    with Client(target, timeout=60) as client:
        expected = client.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8)).text
    assert out.stdout.strip() == expected.strip()
    status = cli("status", "--server", target)
    assert status.returncode == 0, status.stderr
    assert "live" in status.stdout


def _engine_idle(client) -> bool:
    status = client.status()
    return all(r.num_running == 0 and r.num_waiting == 0 and r.kv_usage == 0 for r in status.replicas)


def _seconds_until_idle(client, limit_s: float) -> float:
    start = time.monotonic()
    while not _engine_idle(client):
        assert time.monotonic() - start < limit_s, f"blocks still held: {client.status()}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_cancel_and_deadline_free_the_real_engines_blocks(server):
    _, target = server
    long = SamplingParams(temperature=0, max_tokens=230, ignore_eos=True)
    with Client(target, timeout=60) as client:
        start = time.monotonic()
        client.generate("how long is a whole run", long)
        whole_s = time.monotonic() - start
        # aborted runs must free their blocks well before a whole run would have ended
        stream = client.generate_stream("cancel me", long)
        next(stream)  # generation is under way
        stream.close()  # the client cancels the call mid-stream
        assert _seconds_until_idle(client, 30) < whole_s / 2
        with pytest.raises(DeadlineExceeded):
            client.generate("time me out", long, timeout=whole_s / 4)
        assert _seconds_until_idle(client, 30) < whole_s / 2


def test_sigterm_drains_and_exits(server):
    proc, target = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    with pytest.raises(FolovllmError):
        with Client(target, timeout=2) as client:
            client.model_info()


def test_bad_engine_option_fails_fast_with_the_key(tiny_model_dir):
    out = cli("serve", "--model", str(tiny_model_dir), "--max-num-seqs", "0")
    assert out.returncode == 2
    assert "max_num_seqs" in out.stderr and "greater than or equal to 1" in out.stderr
