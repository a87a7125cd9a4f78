"""Benchmark workloads, seeded so every engine sees the same requests."""
import random
from dataclasses import dataclass


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids
    output_lens: list[int]


def nano_vllm_workload(num_requests: int = 256, min_len: int = 100, max_len: int = 1024,
                       seed: int = 0, vocab: int = 10000) -> Workload:
    """nano-vllm's bench.py: random token prompts and output lengths, both uniform in [min_len, max_len]."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_requests)]
    output_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    return Workload(prompts, output_lens)


def fixed_workload(batch: int, prompt_len: int, output_len: int, seed: int = 0, vocab: int = 10000) -> Workload:
    rng = random.Random(seed)
    return Workload([[rng.randint(0, vocab) for _ in range(prompt_len)] for _ in range(batch)], [output_len] * batch)
