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


def test_host_detail_stamps_the_hosts_path_in_order_and_unwraps(tiny_model_dir, capsys):
    from cluster import llm_engine
    from scheduler.scheduler import Scheduler

    originals = (llm_engine.check_and_pack_token_ids, Scheduler.schedule, llm_engine.LLMEngine._apply)
    request_phases.main(["--model", str(tiny_model_dir), "--prefix-len", "64", "--requests", "3", "--max-model-len", "512",
                         "--host-detail"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows] == ["cold", "warm"]
    # token ids in, scheduled, the batch laid out and launched; the output objects built while the
    # device runs (before the wait); then the tokens, the scheduler's update and the outputs applied
    order = ["check0", "check1", "schedule0", "trie0", "trie1", "schedule1", "launch0", "update0", "update1",
             "prepare0", "prepare1", "forward0", "forward1", "launch1", "build0", "build1", "wait0", "tokens",
             "update_output0", "update_output1", "apply0", "apply1", "total"]
    for row in rows:
        assert [row[k] for k in order] == sorted(row[k] for k in order), row
    assert (llm_engine.check_and_pack_token_ids, Scheduler.schedule, llm_engine.LLMEngine._apply) == originals
