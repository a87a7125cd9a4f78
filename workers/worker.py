"""Worker: one device's share of a replica. The Ray WorkerActor wraps it; tests use it directly."""
import torch

from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from workers.config import ModelConfig
from workers.kv_cache import (CPU_KV_CACHE_BYTES, blocks_needed_at_most, bytes_per_block,
                              num_blocks_for_bytes)
from workers.model_runner import ModelRunner
from workers.parallel import TensorParallelGroup


def resolve_device(device: str) -> torch.device:
    """A concrete device: 'cuda' becomes the current CUDA device (Ray sets CUDA_VISIBLE_DEVICES)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


class Worker:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 hf_config, max_model_len: int, eos_token_ids: list[int], device: str = "auto", parallel: TensorParallelGroup | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False):
        self.device = resolve_device(device)
        self._bind_thread()
        self.parallel = parallel or TensorParallelGroup.single()
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.max_model_len = max_model_len
        self.hf_config = hf_config
        self.runner = ModelRunner(model_config, cache_config, scheduler_config, hf_config, self.device,
                                  self.parallel, eos_token_ids, attention_backend, max_model_len,
                                  enforce_eager)

    def _bind_thread(self) -> None:
        """Make this worker's GPU the calling thread's current device.

        The current CUDA device is per thread, and a Ray actor runs its methods on more than one
        (a compiled graph executes on its own thread). Torch ops follow their tensors' device, but
        Triton launches on the current one: a tensor-parallel rank whose GPU is not index 0 died
        with "Pointer argument cannot be accessed from Triton" on its first bf16 step. Every entry
        point that touches the device calls this (cheap when the device is already current; an
        index skips set_device's parsing of a torch.device, a step's launch calls this too)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index)

    def load_model(self) -> None:
        self._bind_thread()
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        """Blocks this rank can hold; a replica takes the minimum over its ranks."""
        self._bind_thread()
        cfg = self.cache_config
        at_most = blocks_needed_at_most(self.max_model_len, self.scheduler_config.max_num_seqs, cfg.block_size)
        if cfg.num_gpu_blocks is not None:
            return cfg.num_gpu_blocks
        block_bytes = bytes_per_block(self.hf_config, cfg.block_size, self.runner.dtype, self.parallel.tp_size)
        if self.device.type != "cuda":
            return min(at_most, num_blocks_for_bytes(int(CPU_KV_CACHE_BYTES * cfg.gpu_memory_utilization), block_bytes))
        return min(at_most, num_blocks_for_bytes(self._profile_free_bytes(), block_bytes))

    def _profile_free_bytes(self) -> int:
        """Device bytes left for the KV cache after weights and a full-budget forward pass."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.runner.profile_run(self.scheduler_config.max_num_batched_tokens, self.max_model_len,
                                self.scheduler_config.max_num_seqs)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
        return int(total * self.cache_config.gpu_memory_utilization) - peak - max(0, used_by_others)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._bind_thread()
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self._bind_thread()
        return self.runner.execute_model(step)

    def launch(self, step: SchedulerOutput):
        """Enqueue the step and return its handle (result() waits for it); steps run in order."""
        self._bind_thread()
        return self.runner.launch(step)
