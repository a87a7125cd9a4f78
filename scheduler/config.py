"""Configs the scheduler owns: how requests are batched and how the KV cache is laid out."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV cache block.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Fraction of device memory the replica may use for weights, activations and KV cache.")
    num_gpu_blocks: int | None = Field(
        None, ge=1, description="Number of KV cache blocks; overrides sizing from gpu_memory_utilization.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV blocks of identical prompt prefixes across requests.")


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_num_seqs: int = Field(256, ge=1, le=4096, description="Most sequences in one step's batch.")
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="Token budget of one step, prefill chunks and decodes together.")
    enable_chunked_prefill: bool = Field(
        True, description="Split long prompts across steps to fit the token budget.")
    policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="Waiting-queue order: first come first served, or by request priority (lower first).")
    num_scheduler_steps: int = Field(
        1, ge=1, le=64,
        description="Decode passes a worker runs for one scheduled step (as vLLM's --num-scheduler-steps): "
                    "each sequence's next tokens are sampled on the device, one a pass, so the host schedules "
                    "and collects once per k tokens. For host-bound serving (many data-parallel replicas on "
                    "one scheduler); tokens then stream k at a time and new requests wait up to k passes.")
    max_queued_requests: int = Field(
        4096, ge=1, description="Most requests waiting for admission; more are refused as queue full.")
