"""scale_out dp's efficiency: against DP=1 of the same run, or a given DP=1 figure, never itself;
tp --env-ab's comparison of greedy ids under two values of a switch."""
import json

import pytest

from cluster.benchmarks import scale_out


def _run(monkeypatch, tmp_path, argv, per_replica):
    def fake_offline(args, bench, *extra):
        dp = int(extra[extra.index("--data-parallel-size") + 1])
        return [{"bench": bench, "dp": dp, "output_tok_per_s": dp * per_replica[dp]}]

    monkeypatch.setattr(scale_out, "_offline", fake_offline)
    scale_out.main(["dp", "--out", str(tmp_path), *argv])
    return [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]


def test_efficiency_against_dp1_of_the_same_run(monkeypatch, tmp_path):
    rows = _run(monkeypatch, tmp_path, ["--sizes", "1,2,4"], {1: 1000.0, 2: 900.0, 4: 600.0})
    assert [(r["dp"], round(r["efficiency"], 3), r["dp1_from"]) for r in rows] == [
        (1, 1.0, "this run"), (2, 0.9, "this run"), (4, 0.6, "this run")]


def test_a_lone_size_reports_no_efficiency_unless_dp1_is_given(monkeypatch, tmp_path):
    alone = _run(monkeypatch, tmp_path / "alone", ["--sizes", "4"], {4: 600.0})
    assert alone[0]["efficiency"] is None and alone[0]["dp1_from"] is None
    given = _run(monkeypatch, tmp_path / "given", ["--sizes", "4", "--dp1-tok-per-s", "1200"], {4: 600.0})
    assert given[0]["efficiency"] == 0.5 and given[0]["dp1_from"] == "--dp1-tok-per-s"


def test_each_result_is_written_once(monkeypatch, tmp_path):
    """The offline subprocess writes its own lines under offline/; --out holds scale_out's only."""
    commands = []

    def fake_run(cmd, capture_output, text, env=None):
        commands.append(cmd)
        line = json.dumps({"bench": "latency", "tp": 4, "batch": 1, "mean_tpot_ms": 1.0})
        return type("Done", (), {"returncode": 0, "stdout": line + "\n", "stderr": ""})()

    monkeypatch.setattr(scale_out.subprocess, "run", fake_run)
    scale_out.main(["tp", "--perf-only", "--sizes", "4", "--out", str(tmp_path)])
    assert commands[0][commands[0].index("--out") + 1] == str(tmp_path / "offline")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["tp_latency"]


def _run_env_ab(monkeypatch, tmp_path, ids_by_value, argv=("--sizes", "2,4")):
    """tp --env-ab with each fresh process faked: it answers the ids of the value it was given."""
    seen = []

    def fake_run(cmd, capture_output, text, env):
        assert cmd[cmd.index("-m") + 2] == "ids"
        seen.append((int(cmd[cmd.index("--sizes") + 1]), env["FOLOVLLM_FUSE_SILU_MUL"]))
        line = json.dumps({"ids": ids_by_value[env["FOLOVLLM_FUSE_SILU_MUL"]]})
        return type("Done", (), {"returncode": 0, "stdout": "log line\n" + line + "\n", "stderr": ""})()

    monkeypatch.setattr(scale_out.subprocess, "run", fake_run)
    scale_out.main(["tp", *argv, "--dtype", "bfloat16", "--env-ab", "FOLOVLLM_FUSE_SILU_MUL=1,0",
                    "--equality-only", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    return seen, rows


def test_env_ab_compares_each_size_under_both_values_in_fresh_processes(monkeypatch, tmp_path):
    seen, rows = _run_env_ab(monkeypatch, tmp_path, {"1": [[1, 2, 3], [4, 5]], "0": [[1, 2, 3], [4, 5]]})
    assert seen == [(2, "1"), (2, "0"), (4, "1"), (4, "0")]
    assert [(r["bench"], r["tp"], r["env"], r["values"], r["equal"]) for r in rows] == [
        ("tp_env_equality", 2, "FOLOVLLM_FUSE_SILU_MUL", ["1", "0"], True),
        ("tp_env_equality", 4, "FOLOVLLM_FUSE_SILU_MUL", ["1", "0"], True)]


def test_env_ab_reports_where_the_ids_part(monkeypatch, tmp_path):
    _, rows = _run_env_ab(monkeypatch, tmp_path, {"1": [[1, 2, 3], [4, 5]], "0": [[1, 2, 3], [4, 6]]},
                          argv=("--sizes", "2"))
    assert rows[0]["equal"] is False and rows[0]["first_differing_token"] == [None, 1]


def test_env_ab_needs_a_name_and_two_values(tmp_path):
    for spec in ("FOLOVLLM_FUSE_SILU_MUL", "FOLOVLLM_FUSE_SILU_MUL=1", "=1,0", "X=1,0,2"):
        with pytest.raises(SystemExit, match="NAME=A,B"):
            scale_out.main(["tp", "--sizes", "2", "--env-ab", spec, "--equality-only", "--out", str(tmp_path)])
