"""wake_latency's thread and TCP hops (no Ray): one row per hop and gap, in order, with sane times."""
from cluster.benchmarks import wake_latency


def test_a_row_per_hop_and_gap(capsys):
    rows = wake_latency.main(["--hops", "thread", "tcp", "--gaps-ms", "0,2", "--samples-scale", "0.05"])
    assert [(r["hop"], r["gap_ms"], r["n"]) for r in rows] == [
        ("thread", 0, 15), ("thread", 2, 10), ("tcp", 0, 15), ("tcp", 2, 10)]
    assert all(0 < r["p50_us"] <= r["p90_us"] < 1e6 for r in rows)  # a round trip, not a timeout
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]) == 4
