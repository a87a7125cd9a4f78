"""The root engine config: flat options from kwargs and YAML, each bad value named with what is allowed."""
import pytest

from cluster.cli import build_parser
from cluster.cli_args import engine_config_from_args
from cluster.config import EngineConfig, allowed_keys, engine_args_from_yaml
from scheduler.errors import InvalidRequestError
from workers.config import ModelConfig, ParallelConfig


def test_flat_options_land_in_their_sections():
    c = EngineConfig.from_flat(model="m", dtype="float16", max_num_seqs=3, block_size=32,
                               data_parallel_size=2, device="cpu")
    assert (c.model.model, c.model.dtype, c.scheduler.max_num_seqs, c.cache.block_size) == ("m", "float16", 3, 32)
    assert c.parallel.data_parallel_size == 2 and c.runtime.device == "cpu"
    assert c.wants_ray, "data parallel engines run on Ray"
    assert EngineConfig.from_flat(c.to_flat()) == c


@pytest.mark.parametrize("key,value,allowed", [
    ("dtype", "int8", "'auto', 'bfloat16', 'float16' or 'float32'"),
    ("load_format", "pt", "'auto', 'safetensors' or 'dummy'"),
    ("max_model_len", 0, "greater than or equal to 1"),
    ("seed", -1, "greater than or equal to 0"),
    ("model", "", "at least 1 character"),
    ("data_parallel_size", 0, "greater than or equal to 1"),
    ("tensor_parallel_size", 65, "less than or equal to 64"),
    ("block_size", 0, "greater than or equal to 1"),
    ("gpu_memory_utilization", 1.5, "less than or equal to 1"),
    ("num_gpu_blocks", 0, "greater than or equal to 1"),
    ("max_num_seqs", 0, "greater than or equal to 1"),
    ("max_num_batched_tokens", 0, "greater than or equal to 1"),
    ("policy", "lifo", "'fcfs' or 'priority'"),
    ("max_queued_requests", 0, "greater than or equal to 1"),
    ("device", "tpu", "'auto', 'cuda' or 'cpu'"),
    ("attention_backend", "flash", "'auto', 'torch' or 'triton'"),
    ("enable_prefix_caching", "maybe", "valid boolean"),
])
def test_every_bad_value_names_the_key_and_what_is_allowed(key, value, allowed):
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig.from_flat({key: value})
    assert e.value.field == key
    assert allowed in str(e.value)


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(InvalidRequestError, match="unknown engine option; allowed: .*max_num_seqs") as e:
        EngineConfig.from_flat(max_num_seq=4)
    assert e.value.field == "max_num_seq"
    assert "max_num_seqs" in allowed_keys()


def test_chunked_prefill_off_needs_a_budget_for_the_longest_prompt():
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens: must be >= max_model_len \(200\)"):
        EngineConfig.from_flat(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=200)


def test_sections_forbid_unknown_fields():
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(model="m", quantization="gptq")
    with pytest.raises(ValueError, match="data_parallel_size"):
        ParallelConfig(data_parallel_size=-1)


def test_yaml_in_serve_format_and_flat(tmp_path):
    serve_yaml = tmp_path / "ray_config.yaml"
    serve_yaml.write_text("applications:\n  - name: a\n    import_path: x:y\n    args:\n"
                          "      engine:\n        model: tiny\n        max_num_seqs: 7\n")
    assert engine_args_from_yaml(serve_yaml) == {"model": "tiny", "max_num_seqs": 7}
    assert EngineConfig.from_yaml(serve_yaml).scheduler.max_num_seqs == 7
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: tiny\nblock_size: 8\n")
    assert EngineConfig.from_yaml(flat).cache.block_size == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nblock_size: -3\n")
    with pytest.raises(InvalidRequestError, match="block_size"):
        EngineConfig.from_yaml(bad)


def test_shipped_ray_config_is_valid():
    config = EngineConfig.from_yaml("ray_config.yaml")
    assert config.model.model == "Qwen/Qwen3-0.6B"
    assert config.parallel.data_parallel_size == 1


def test_cli_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nmax_num_seqs: 7\nblock_size: 8\n")
    args = build_parser().parse_args(["generate", "hi", "--config", str(path), "--max-num-seqs", "9"])
    config = engine_config_from_args(args)
    assert (config.model.model, config.scheduler.max_num_seqs, config.cache.block_size) == ("tiny", 9, 8)


def test_unknown_model_is_named_with_what_is_accepted(tmp_path):
    from cluster.model_info import resolve

    with pytest.raises(InvalidRequestError, match="model: .*not a local directory with config.json.*Qwen/Qwen3-0.6B"):
        resolve(EngineConfig.from_flat(model=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InvalidRequestError, match="qwen3 only"):
        resolve(EngineConfig.from_flat(model=str(tmp_path)))


def test_tensor_parallel_size_must_divide_query_and_key_value_heads(tiny_model_dir):
    from cluster.model_info import resolve

    # the tiny model: 4 attention heads, 2 key-value heads
    with pytest.raises(InvalidRequestError, match="must divide the model's 4 attention heads, got 3"):
        resolve(EngineConfig.from_flat(model=str(tiny_model_dir), tensor_parallel_size=3))
    with pytest.raises(InvalidRequestError, match="must divide the model's 2 key-value heads, got 4"):
        resolve(EngineConfig.from_flat(model=str(tiny_model_dir), tensor_parallel_size=4))
    assert resolve(EngineConfig.from_flat(model=str(tiny_model_dir), tensor_parallel_size=2)).max_model_len == 512
