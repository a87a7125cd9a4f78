"""WorkerActor: one device's Worker as a Ray actor. A replica is tp_size of them in one placement group.

The class is plain Python: cluster/launcher.py applies ray.remote (with a "ctrl" concurrency group,
so that liveness pings are answered while a step runs). Every rank gets the same step; only rank 0
returns the sampled tokens, the others return None (their logits are identical after all-gather).
"""
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from workers.config import ModelConfig
from workers.gc_freeze import freeze_startup_objects
from workers.parallel import TensorParallelGroup
from workers.worker import Worker

# A rank that never joins (its process died during start-up) must fail the others, not hang them.
TP_INIT_TIMEOUT = datetime.timedelta(seconds=120)


@dataclass
class WorkerSpec:
    """Everything a rank needs to build its Worker; the same for every rank of every replica."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    hf_config: object  # transformers Qwen3Config (pickles)
    max_model_len: int
    eos_token_ids: list[int]
    device: str  # "cuda" or "cpu"; Ray gives each CUDA actor one visible GPU
    attention_backend: str = "auto"
    enforce_eager: bool = False
    num_threads: int | None = None  # CPU: torch threads per worker, so replicas share the cores


class WorkerActor:
    def __init__(self, spec: WorkerSpec, tp_rank: int, tp_size: int):
        if spec.device == "cpu" and spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.worker: Worker | None = None
        self._inflight = None  # the StepHandle of the last step launched, not yet returned

    def ping(self) -> bool:
        return True

    def init_address(self) -> str:
        """Rank 0: a tcp:// rendezvous address on this node with a port free right now."""
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def gpu_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_accelerator_ids()["GPU"][0]

    def init_worker(self, init_method: str | None, visible_gpus: list[str] | None = None) -> None:
        """Join the replica's process group (all ranks call this at once), then build the Worker.

        visible_gpus: every GPU of the replica (on one node). Each rank sees them all and uses its
        own by index, as torchrun does: NCCL needs to see its peers to use NVLink / P2P.
        """
        device = self.spec.device
        if visible_gpus:
            own = self.gpu_id()
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)  # before CUDA initialises
            device = f"cuda:{visible_gpus.index(own)}"
        parallel = TensorParallelGroup.single()
        if self.tp_size > 1:
            backend = "nccl" if self.spec.device == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init_method, world_size=self.tp_size,
                                    rank=self.tp_rank, timeout=TP_INIT_TIMEOUT)
            parallel = TensorParallelGroup.init(self.tp_rank, self.tp_size, init_method, backend)
        s = self.spec
        self.worker = Worker(model_config=s.model_config, cache_config=s.cache_config,
                             scheduler_config=s.scheduler_config, hf_config=s.hf_config,
                             max_model_len=s.max_model_len, eos_token_ids=s.eos_token_ids, device=device,
                             parallel=parallel, attention_backend=s.attention_backend,
                             enforce_eager=s.enforce_eager)

    def load_model(self) -> None:
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)
        # the worker process's last start-up step (graphs captured); the in-process engine
        # freezes once itself, in LLMEngine.__init__: see gc_freeze.py
        freeze_startup_objects()

    def execute_model(self, step: SchedulerOutput | None) -> ModelRunnerOutput | None:
        """Launch step (if any); return the output of the step launched before it (None if none)."""
        prev, self._inflight = self._inflight, (self.worker.launch(step) if step is not None else None)
        output = prev.result() if prev is not None else None  # every rank: its batch state advances
        return output if self.tp_rank == 0 else None

    def pid(self) -> int:
        return os.getpid()


class NoopWorkerActor(WorkerActor):
    """The step path without a model: for measuring Ray's round trip and for executor tests."""

    def init_worker(self, init_method: str | None, visible_gpus: list[str] | None = None) -> None:
        pass

    def load_model(self) -> None:
        pass

    def determine_num_blocks(self) -> int:
        return self.spec.cache_config.num_gpu_blocks or 1024

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def execute_model(self, step: SchedulerOutput | None) -> ModelRunnerOutput | None:
        prev, self._inflight = self._inflight, step
        if self.tp_rank != 0 or prev is None:
            return None
        req_ids = [r.req_id for r in prev.scheduled_new_reqs] + list(prev.scheduled_cached_reqs.req_ids)
        # a multi-step samples a token a pass: as many as the sequence's scheduled tokens
        per_seq = prev.num_scheduled_tokens if prev.decode_steps > 1 else dict.fromkeys(req_ids, 1)
        return ModelRunnerOutput(req_ids, [[7] * per_seq[r] for r in req_ids], [None] * len(req_ids))
