"""Start-up checks of the launcher against a faked cluster (no Ray started)."""
import pytest

pytest.importorskip("ray")

from cluster import launcher  # noqa: E402
from cluster.config import EngineConfig  # noqa: E402
from scheduler.errors import InvalidRequestError  # noqa: E402


def fake_nodes(monkeypatch, *gpus_per_node):
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": float(g)}} for g in gpus_per_node]
    nodes.append({"Alive": False, "Resources": {"GPU": 8.0}})  # a dead node's GPUs do not count
    monkeypatch.setattr(launcher.ray, "nodes", lambda: nodes)


def config(dp: int, tp: int) -> EngineConfig:
    return EngineConfig.from_flat(data_parallel_size=dp, tensor_parallel_size=tp)


def test_replicas_that_fit_pass(monkeypatch):
    fake_nodes(monkeypatch, 4, 4)
    launcher.check_cluster(config(4, 2), "cuda")
    launcher.check_cluster(config(64, 8), "cpu")  # CPU workers take no GPU


@pytest.mark.parametrize("gpus, dp, tp, message", [
    ((2,), 2, 2, "needs 4 GPUs; the Ray cluster has 2"),
    ((2, 2), 1, 4, "must share one node; the largest node has 2"),
    ((3, 3), 3, 2, "3 replicas of 2 GPUs on one node each do not fit"),
])
def test_what_is_missing_is_named(monkeypatch, gpus, dp, tp, message):
    fake_nodes(monkeypatch, *gpus)
    with pytest.raises(InvalidRequestError, match=message):
        launcher.check_cluster(config(dp, tp), "cuda")


def test_actor_names_are_unique_per_engine_replica_and_rank():
    assert launcher.scheduler_actor_name("ab12") == "folovllm-ab12-scheduler"
    assert launcher.worker_actor_name("ab12", 1, 0) == "folovllm-ab12-worker-r1-t0"
