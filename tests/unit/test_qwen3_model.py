"""Our Qwen3 over the paged KV cache with the torch reference backend against HF transformers."""
import pytest
import torch

from tests.conftest import PagedSeqs, allocate_kv_caches
from workers.config import ModelConfig
from workers.model_configs import BUILTIN_CONFIGS, resolve_model
from workers.weight_loader import checkpoint_dtype, hf_weight_shapes, load_model, resolve_dtype

ATOL = 1e-4
BLOCK_SIZE = 4
PROMPT_LENS = [1, 3, 4, 5, 9, 12, 17, 23]  # empty to several blocks, on and off block boundaries


def load_ours(model_dir, **overrides):
    hf_config, _ = resolve_model(str(model_dir))
    model_config = ModelConfig(model=str(model_dir), dtype="float32", **overrides)
    return load_model(model_config, hf_config, "cpu", torch.float32), hf_config


def load_hf(model_dir):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:  # [len(tokens), vocab]
    return hf_model(torch.tensor([tokens])).logits[0].float()


def prompts(n=len(PROMPT_LENS), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151643, (length,), generator=g).tolist() for length in PROMPT_LENS[:n]]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    ours, hf_config = load_ours(tiny_model_dir)
    return ours, load_hf(tiny_model_dir), hf_config


@torch.no_grad()
def run_step(model, paged, kv_caches, chunks: dict) -> torch.Tensor:  # -> logits [T, vocab]
    input_ids, positions, metadata = paged.step(chunks)
    return model.compute_logits(model(input_ids, positions, kv_caches, metadata))


def check_batched_prefill(model, hf_model, hf_config):
    paged = PagedSeqs(BLOCK_SIZE, num_blocks=64)
    kv_caches = allocate_kv_caches(hf_config, 64, BLOCK_SIZE)
    batch = prompts()
    logits = run_step(model, paged, kv_caches, dict(enumerate(batch)))
    assert logits.dtype == torch.float32 and logits.shape == (sum(PROMPT_LENS), hf_config.vocab_size)
    for tokens, ours in zip(batch, logits.split(PROMPT_LENS)):
        torch.testing.assert_close(ours, hf_logits(hf_model, tokens), atol=ATOL, rtol=0)
    assert len(set(b for t in paged.block_tables.values() for b in t)) == sum(-(-n // 4) for n in PROMPT_LENS)


def test_batched_prefill_matches_hf(models):
    check_batched_prefill(*models)


def test_untied_lm_head_matches_hf(tiny_model_dir_untied):
    model, hf_config = load_ours(tiny_model_dir_untied)
    assert not hf_config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    check_batched_prefill(model, load_hf(tiny_model_dir_untied), hf_config)


def test_incremental_decode_matches_hf(models):
    model, hf_model, hf_config = models
    paged = PagedSeqs(BLOCK_SIZE, num_blocks=64, seed=1)
    kv_caches = allocate_kv_caches(hf_config, 64, BLOCK_SIZE)
    seqs = dict(enumerate(prompts(4, seed=1)))
    logits = run_step(model, paged, kv_caches, seqs)
    last = torch.tensor([len(t) for t in seqs.values()]).cumsum(0) - 1
    next_tokens = logits[last].argmax(-1).tolist()
    for _ in range(6):  # every sequence decodes one greedy token per step, all in one batch
        for seq_id, token in zip(seqs, next_tokens):
            seqs[seq_id].append(token)
        logits = run_step(model, paged, kv_caches, {s: [t] for s, t in zip(seqs, next_tokens)})
        assert logits.shape[0] == len(seqs)
        for seq_id, row in zip(seqs, logits):
            torch.testing.assert_close(row, hf_logits(hf_model, seqs[seq_id])[-1], atol=ATOL, rtol=0)
        next_tokens = logits.argmax(-1).tolist()


def test_chunked_prefill_over_cached_prefix(models):
    model, hf_model, hf_config = models
    paged = PagedSeqs(BLOCK_SIZE, num_blocks=64, seed=2)
    kv_caches = allocate_kv_caches(hf_config, 64, BLOCK_SIZE)
    long, fresh, decoding = prompts(8, seed=2)[7], prompts(8, seed=3)[5], prompts(8, seed=4)[4]
    run_step(model, paged, kv_caches, {"long": long[:10], "decoding": decoding})
    # One mixed step: the rest of a chunked prompt over its cached 10 tokens, a new prompt, a decode.
    logits = run_step(model, paged, kv_caches, {"long": long[10:], "fresh": fresh, "decoding": [42]})
    chunk, new, dec = logits.split([len(long) - 10, len(fresh), 1])
    torch.testing.assert_close(chunk, hf_logits(hf_model, long)[10:], atol=ATOL, rtol=0)
    torch.testing.assert_close(new, hf_logits(hf_model, fresh), atol=ATOL, rtol=0)
    torch.testing.assert_close(dec[0], hf_logits(hf_model, decoding + [42])[-1], atol=ATOL, rtol=0)


def test_padding_rows_are_ignored(models):
    """Rows with seq_len 0 (CUDA-graph padding, slot -1) write nothing and read as zeros."""
    model, _, hf_config = models
    paged = PagedSeqs(BLOCK_SIZE, num_blocks=16)
    kv_caches = allocate_kv_caches(hf_config, 16, BLOCK_SIZE)
    input_ids, positions, md = paged.step({0: [1, 2, 3]})
    q = torch.randn(4, 4, 16)
    kv = torch.randn(4, 2, 16)
    md.slot_mapping = torch.cat([md.slot_mapping, torch.tensor([-1])])
    md.query_start_loc_cpu, md.seq_lens_cpu = md.query_start_loc_cpu + [4], md.seq_lens_cpu + [0]
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables)])
    attn = model.model.layers[0].self_attn.attn
    out = attn.forward(q, kv, kv, kv_caches[0], md, 0.25)
    assert out[3].abs().sum() == 0 and out[:3].abs().sum() > 0


def test_weights_roundtrip_by_name(models, tiny_model_dir):
    """Every HF tensor landed where it belongs, packed q/k/v and gate/up included."""
    from safetensors.torch import load_file

    model, _, hf_config = models
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {n for n, _ in hf_weight_shapes(hf_config)} == set(state)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = torch.cat([state[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, qkv)
    gate_up = torch.cat([state[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(attn.k_norm.weight, state["model.layers.1.self_attn.k_norm.weight"])


def test_missing_weight_is_an_error(models):
    model, _, _ = models
    with pytest.raises(ValueError, match="missing"):
        model.check_all_loaded(model.load_weights([("model.norm.weight", torch.ones(64))]))


def test_builtin_configs_build_on_meta():
    """Every built-in size builds with the real shapes, without allocating."""
    for name, config in BUILTIN_CONFIGS.items():
        hf_config, model_dir = resolve_model(name)
        assert model_dir is None or (model_dir / "config.json").is_file()
        assert hf_config.vocab_size == 151936 and hf_config.head_dim == 128
        model = load_model(ModelConfig(model=name, load_format="dummy"), hf_config, "meta", torch.bfloat16)
        layer = model.model.layers[0]
        q_kv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * 128
        assert layer.self_attn.qkv_proj.weight.shape == (q_kv, config["hidden_size"])
        assert layer.mlp.gate_up_proj.weight.shape == (2 * config["intermediate_size"], config["hidden_size"])
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == config["tie_word_embeddings"]
    n = sum(p.numel() for p in load_model(ModelConfig(load_format="dummy"), resolve_model("Qwen/Qwen3-0.6B")[0],
                                           "meta", torch.bfloat16).parameters())
    assert 0.59e9 < n < 0.60e9  # Qwen3-0.6B: 596M parameters with the tied embedding


def test_dummy_weights_are_deterministic_and_sane():
    """Qwen3-0.6B's real widths (2 layers, a cut vocabulary): dummy load gives sane, seed-determined logits."""
    hf_config, _ = resolve_model("Qwen/Qwen3-0.6B")
    hf_config.num_hidden_layers, hf_config.vocab_size = 2, 8192
    dummy = ModelConfig(load_format="dummy", seed=7)
    a = load_model(dummy, hf_config, "cpu", torch.float32)
    b = load_model(dummy, hf_config, "cpu", torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert torch.all(a.model.norm.weight == 1)
    paged = PagedSeqs(16, num_blocks=8)
    logits = run_step(a, paged, allocate_kv_caches(hf_config, 8, 16), {0: list(range(100, 140))})
    assert torch.isfinite(logits).all() and 0.01 < logits.std() < 10


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu", torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", "cuda", "float32") == torch.bfloat16
    assert resolve_dtype("auto", "cuda", torch.float16) == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_checkpoint_dtype_reads_dtype_where_transformers_has_it():
    from types import SimpleNamespace

    from transformers import Qwen3Config

    class Config:  # transformers >= 4.56: dtype, and a torch_dtype that warns on every read
        def __init__(self):
            self.dtype = torch.float16

        @property
        def torch_dtype(self):
            raise AssertionError("read the deprecated torch_dtype")

    assert checkpoint_dtype(Config()) == torch.float16
    assert checkpoint_dtype(SimpleNamespace(torch_dtype="float16")) == "float16"  # older transformers
    config = Qwen3Config.from_dict({**BUILTIN_CONFIGS["Qwen/Qwen3-0.6B"], "torch_dtype": "float16"})
    assert resolve_dtype("auto", "cuda", checkpoint_dtype(config)) == torch.float16
