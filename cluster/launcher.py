"""Engine launcher: Ray (embedded or joined), one SchedulerActor, and each replica's WorkerActors.

    client, shutdown = launch_engine(EngineConfig.from_flat(model=..., data_parallel_size=2))

Layout: the SchedulerActor owns the replicas (it creates their placement groups and workers, so
they die with it and come back when Ray restarts it). A replica is tensor_parallel_size
WorkerActors in one STRICT_PACK placement group: {"GPU": 1} bundles on CUDA, a sliver of CPU
otherwise (so that several CPU workers and the scheduler fit on a small machine). Names:
folovllm-{engine_id}-scheduler and folovllm-{engine_id}-worker-r{replica}-t{rank}, in the
"folovllm" namespace, so `ray list actors` and EngineClient.connect find them.
"""
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray.util.placement_group import (get_placement_group, placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.config import EngineConfig
from cluster.model_info import ResolvedModel, resolve
from cluster.ray_executor import CTRL_GROUP, RayExecutor
from scheduler.errors import InvalidRequestError
from workers.worker_actor import WorkerActor, WorkerSpec

logger = logging.getLogger(__name__)

NAMESPACE = "folovllm"
CPU_PER_WORKER = 0.01  # CPU workers reserve almost nothing: torch threads are set per worker instead
PLACEMENT_TIMEOUT_S = float(os.environ.get("FOLOVLLM_PLACEMENT_TIMEOUT_S", 60))
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scheduler_actor_name(engine_id: str) -> str:
    return f"folovllm-{engine_id}-scheduler"


def worker_actor_name(engine_id: str, replica_id: int, rank: int) -> str:
    return f"folovllm-{engine_id}-worker-r{replica_id}-t{rank}"


# ---- Ray itself ----------------------------------------------------------------------------------

def init_ray(config: EngineConfig) -> bool:
    """Join config.runtime.ray_address, or start an embedded local instance; True if we started it."""
    if ray.is_initialized():
        return False
    address = config.runtime.ray_address
    # Workers import scheduler/, workers/, cluster/ from this checkout when it is not installed.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=True)
    else:
        # the dashboard stays on (Ray's default): `ray list actors` and the state API need it
        ray.init(num_cpus=os.cpu_count() or 1, namespace=NAMESPACE, runtime_env=runtime_env)
    return True


def pick_device(config: EngineConfig) -> str:
    """auto: CUDA when the Ray cluster has GPUs, else the CPU (the cluster, not this process, decides)."""
    num_gpus = ray.cluster_resources().get("GPU", 0)
    device = config.runtime.device
    if device == "auto":
        return "cuda" if num_gpus > 0 else "cpu"
    if device == "cuda" and num_gpus == 0:
        raise InvalidRequestError("device", "'cuda' was asked for but the Ray cluster has no GPU")
    return device


def check_cluster(config: EngineConfig, device: str) -> None:
    """Fail at start-up, naming what is missing, when the replicas cannot all be placed."""
    dp, tp = config.parallel.data_parallel_size, config.parallel.tensor_parallel_size
    if device != "cuda":
        return
    per_node = sorted((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), reverse=True)
    total = sum(per_node)
    if dp * tp > total:
        raise InvalidRequestError(
            "data_parallel_size", f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs; "
                                  f"the Ray cluster has {total:g}")
    if not per_node or per_node[0] < tp:
        raise InvalidRequestError(
            "tensor_parallel_size", f"a replica's {tp} GPUs must share one node; the largest node has "
                                    f"{per_node[0] if per_node else 0:g}")
    # a replica fits on a node only whole: count how many each node can hold
    if sum(int(g // tp) for g in per_node) < dp:
        raise InvalidRequestError(
            "data_parallel_size", f"{dp} replicas of {tp} GPUs on one node each do not fit the nodes' GPUs "
                                  f"{[int(g) for g in per_node]}")


# ---- one replica -----------------------------------------------------------------------------------

@dataclass
class EnginePlan:
    """What every replica start needs; built once, reused when a replica restarts."""

    engine_id: str
    config: EngineConfig
    model: ResolvedModel
    spec: WorkerSpec
    use_compiled_graph: bool | None = None
    worker_cls: type = WorkerActor  # NoopWorkerActor for step-path benchmarks

    @property
    def tp_size(self) -> int:
        return self.config.parallel.tensor_parallel_size


def plan_engine(config: EngineConfig, engine_id: str, use_compiled_graph: bool | None = None,
                worker_cls: type = WorkerActor) -> EnginePlan:
    model = resolve(config)  # also checks that TP divides the attention and KV heads
    device = pick_device(config)
    check_cluster(config, device)
    p = config.parallel
    num_workers = p.data_parallel_size * p.tensor_parallel_size
    threads = max(1, (os.cpu_count() or 1) // num_workers) if device == "cpu" else None
    spec = WorkerSpec(config.model, config.cache, config.scheduler, model.hf_config, model.max_model_len,
                      model.eos_token_ids, device, config.runtime.attention_backend,
                      config.runtime.enforce_eager, threads)
    return EnginePlan(engine_id, config, model, spec, use_compiled_graph, worker_cls)


@dataclass
class StartedReplica:
    executor: RayExecutor
    num_blocks: int


def start_replica(plan: EnginePlan, replica_id: int) -> StartedReplica:
    """Placement group, tp_size workers, process group, weights, KV cache; then the executor."""
    tp, cuda = plan.tp_size, plan.spec.device == "cuda"
    bundle = {"GPU": 1} if cuda else {"CPU": CPU_PER_WORKER}
    # unique per start: the group of a lost generation may still be on its way out
    pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK",
                         name=f"{_pg_prefix(plan.engine_id)}{replica_id}-{uuid.uuid4().hex[:8]}")
    workers = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"replica {replica_id}: no node could hold {tp} x {bundle} within "
                               f"{PLACEMENT_TIMEOUT_S:g}s; cluster resources: {ray.available_resources()}")
        actor_cls = ray.remote(concurrency_groups={CTRL_GROUP: 1})(plan.worker_cls)
        for rank in range(tp):
            name = worker_actor_name(plan.engine_id, replica_id, rank)
            _kill_named(name)  # a previous generation of this replica that has not quite gone
            workers.append(actor_cls.options(
                name=name, namespace=NAMESPACE, num_cpus=0 if cuda else CPU_PER_WORKER,
                num_gpus=1 if cuda else 0, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(plan.spec, rank, tp))
        init_method = ray.get(workers[0].init_address.remote()) if tp > 1 else None
        visible_gpus = None
        if cuda and tp > 1:
            visible_gpus = sorted(set(ray.get([w.gpu_id.remote() for w in workers])), key=_gpu_order)
        ray.get([w.init_worker.remote(init_method, visible_gpus) for w in workers])
        ray.get([w.load_model.remote() for w in workers])
        num_blocks = min(ray.get([w.determine_num_blocks.remote() for w in workers]))
        if num_blocks < 1:
            raise RuntimeError(f"replica {replica_id}: no memory left for the KV cache; "
                               f"raise gpu_memory_utilization or use a smaller model")
        ray.get([w.init_kv_cache.remote(num_blocks) for w in workers])
        executor = RayExecutor(workers, pg, plan.use_compiled_graph, replica_id)
    except BaseException:
        for w in workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(pg)
        raise
    return StartedReplica(executor, num_blocks)


def start_replicas(plan: EnginePlan, replica_ids: list[int]) -> list[StartedReplica]:
    """Start replicas concurrently (model loading dominates); all or nothing."""
    with ThreadPoolExecutor(max(1, len(replica_ids))) as pool:
        futures = [pool.submit(start_replica, plan, i) for i in replica_ids]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised after the others are released
                error = error or e
    if error is not None:
        for started in results:
            started.executor.shutdown()
        raise error
    return results


def _gpu_order(gpu_id: str):
    return (0, int(gpu_id), "") if gpu_id.isdigit() else (1, 0, gpu_id)  # ids may be UUIDs


def _pg_prefix(engine_id: str) -> str:
    return f"folovllm-{engine_id}-r"


def remove_stale_placement_groups(engine_id: str) -> None:
    """Placement groups outlive the actor that made them: a restarted scheduler frees its
    predecessor's (they would hold GPUs its new replicas need)."""
    for info in placement_group_table().values():
        name = info.get("name") or ""
        if name.startswith(_pg_prefix(engine_id)) and info.get("state") != "REMOVED":
            try:
                remove_placement_group(get_placement_group(name))
            except Exception:  # noqa: BLE001 - removed meanwhile
                pass


def _kill_named(name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass


# ---- the engine --------------------------------------------------------------------------------------

def launch_engine(config: EngineConfig, *, engine_id: str | None = None, use_compiled_graph: bool | None = None,
                  max_restarts: int = 3, worker_cls: type = WorkerActor):
    """Start (or join) Ray, the SchedulerActor and its replicas; returns (EngineClient, shutdown).

    Blocks until every replica is loaded. Errors in the config or the cluster (too few GPUs, TP not
    dividing the heads) raise InvalidRequestError here, before any actor starts. shutdown() stops
    the engine, and Ray too when this call started it.
    """
    from cluster.engine_client import EngineClient
    from cluster.scheduler_actor import SchedulerActor

    started_ray = init_ray(config)
    engine_id = engine_id or uuid.uuid4().hex[:8]
    try:
        plan_engine(config, engine_id, use_compiled_graph, worker_cls)  # validate here, with a clear error
        actor = ray.remote(SchedulerActor).options(
            name=scheduler_actor_name(engine_id), namespace=NAMESPACE, num_cpus=0,
            max_restarts=max_restarts, max_task_retries=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        ).remote(config, engine_id, use_compiled_graph, worker_cls)
        model_info, _ = ray.get(actor.ready.remote())
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    client = EngineClient(actor, model_info)

    def shutdown() -> None:
        client.close()
        try:
            ray.get(actor.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()

    return client, shutdown
