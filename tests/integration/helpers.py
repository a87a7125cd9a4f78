"""Helpers shared by the integration tests: ports, polling, and a `folovllm serve` subprocess."""
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll predicate until it returns something true; fail naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def start_cli_server(model_dir, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`folovllm serve` on the tiny model (CPU, loopback); returns once it answers, with its target."""
    from cluster.client import Client, FolovllmError

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model_dir), "--device", "cpu",
         "--max-model-len", "256", "--num-gpu-blocks", "256", "--host", "127.0.0.1", "--port", str(port),
         "--drain-timeout-s", "5"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, f"folovllm serve exited early:\n{proc.stdout.read()}"
        try:
            with Client(target, timeout=2) as client:
                client.model_info()
            return True
        except FolovllmError:
            return False

    try:
        wait_for(answers, timeout_s, "folovllm serve to come up")
    except BaseException:
        stop_cli_server(proc)
        raise
    return proc, target


def stop_cli_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
