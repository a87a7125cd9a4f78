"""request_phases times a cold and a warm prefix request through the real engine and puts each
stamp of the worker's step in order; its wrappers come off afterwards."""
import json

from cluster.benchmarks import request_phases
from workers.model_runner import ModelRunner, StepHandle


def test_stamps_each_phase_in_order_and_unwraps(tiny_model_dir, capsys):
    originals = (ModelRunner.launch, ModelRunner._forward, ModelRunner._sample, StepHandle.result)
    request_phases.main(["--model", str(tiny_model_dir), "--prefix-len", "64", "--requests", "3", "--max-model-len", "512"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows] == ["cold", "warm"]
    order = ["launch0", "forward0", "forward1", "sample0", "sample1", "launch1", "wait0", "tokens", "total"]
    for row in rows:
        assert [row[k] for k in order] == sorted(row[k] for k in order), row
    assert (ModelRunner.launch, ModelRunner._forward, ModelRunner._sample, StepHandle.result) == originals
