"""scheduler_bench runs the real Scheduler for the steps asked and reports a time per step."""
import json

import pytest

from cluster.benchmarks import scheduler_bench


def test_reports_its_steps(capsys):
    scheduler_bench.main(["--seqs", "4", "--steps", "3"])
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["bench"] == "scheduler" and result["seqs"] == 4
    assert result["ms_per_step"] > 0 and result["us_per_seq"] == pytest.approx(result["ms_per_step"] * 1e3 / 4)
