"""Shared fixtures: a tiny random Qwen3 checkpoint in HF format (with the real tokenizer), and helpers
that lay sequences out on a paged KV cache the way the model runner does."""
import random
from dataclasses import dataclass, field

import pytest
import torch

from workers.attention.base import AttentionMetadata

TINY_CONFIG = dict(
    vocab_size=151936,  # the real vocabulary, so the real tokenizer fits
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rope_theta=1000000,
    rms_norm_eps=1e-6,
    initializer_range=0.05,  # larger than HF's 0.02, so attention and MLP visibly shape the logits
    bos_token_id=151643,
    eos_token_id=151645,
    dtype="float32",
)


def write_tiny_checkpoint(directory, tie_word_embeddings: bool, seed: int = 0) -> None:
    """config.json, generation_config.json, model.safetensors (float32) and the Qwen3 tokenizer files."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from workers.model_configs import GENERATION_CONFIG
    from workers.tokenizer import build_qwen3_tokenizer

    config = Qwen3Config(**TINY_CONFIG, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # HF inits norms at 1; perturb them so loading them is actually checked
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(directory)
    build_qwen3_tokenizer().save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen3")
    write_tiny_checkpoint(directory, tie_word_embeddings=True)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir_untied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen3_untied")
    write_tiny_checkpoint(directory, tie_word_embeddings=False, seed=1)
    return directory


# ---- paged-cache helpers (plain functions: import them with `from tests.conftest import ...`) ----

def allocate_kv_caches(hf_config, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu",
                       tp_size: int = 1) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads / tp_size, head_dim] tensor per layer, in layer order."""
    shape = (2, num_blocks, block_size, hf_config.num_key_value_heads // tp_size, hf_config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(hf_config.num_hidden_layers)]


@dataclass
class PagedSeqs:
    """Sequences on a paged cache, with block ids handed out in a shuffled (non-contiguous) order."""
    block_size: int
    num_blocks: int
    seed: int = 0
    block_tables: dict = field(default_factory=dict)  # seq id -> list of block ids
    num_cached: dict = field(default_factory=dict)  # seq id -> tokens already in the cache

    def __post_init__(self):
        self.free_blocks = list(range(1, self.num_blocks))  # block 0 stays unused, as padding
        random.Random(self.seed).shuffle(self.free_blocks)

    def step(self, chunks: dict, device="cpu") -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """chunks: seq id -> new token ids this step -> (input_ids [T], positions [T], metadata)."""
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq_id, tokens in chunks.items():
            start = self.num_cached.get(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free_blocks.pop())
            for pos in range(start, start + len(tokens)):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += list(tokens)
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            seq_lens.append(start + len(tokens))
            self.num_cached[seq_id] = start + len(tokens)
        tables = [self.block_tables[s] for s in chunks]
        width = max(len(t) for t in tables)
        query_start_loc = [0]
        for n in query_lens:
            query_start_loc.append(query_start_loc[-1] + n)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return (torch.tensor(input_ids, dtype=torch.int64, device=device),
                torch.tensor(positions, dtype=torch.int64, device=device), metadata)
