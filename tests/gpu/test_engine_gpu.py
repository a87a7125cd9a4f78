"""The whole engine on CUDA: Triton kernels and CUDA graphs keep greedy output identical to the
plain path (torch reference attention, eager) and to HuggingFace on the same GPU."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["Hi", "The capital of France is", "你好，世界！", "def f(x):\n    return",
           "one two three four five six seven eight nine ten " * 6, "🦊🦊🦊", "a b c", "The quick brown fox"]


def _run(model_dir, prompts, **kwargs):
    from cluster import LLM, SamplingParams

    llm = LLM(str(model_dir), device="cuda", num_gpu_blocks=512, block_size=16, max_model_len=512,
              max_num_seqs=16, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.scheduler.block_manager.check_no_leaks()
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return _run(tiny_model_dir, PROMPTS, dtype="float32", attention_backend="torch", enforce_eager=True)[1]


def test_triton_and_cuda_graphs_match_reference_path(tiny_model_dir, reference):
    llm, tokens = _run(tiny_model_dir, PROMPTS, dtype="float32", attention_backend="triton")
    runner = llm.engine.worker.runner
    assert runner.decode_graphs is not None, "decode steps should replay CUDA graphs"
    assert runner.prefill_graphs.replays > 0, "the prompts' prefill should replay a CUDA graph"
    assert tokens == reference


def test_prefill_graphs_with_chunks_mixed_into_decodes_match_reference_path(tiny_model_dir, reference):
    # a 24-token budget splits the longer prompts into chunks that share steps with other rows' decodes
    llm, tokens = _run(tiny_model_dir, PROMPTS, dtype="float32", attention_backend="triton",
                       max_num_batched_tokens=24)
    assert llm.engine.worker.runner.prefill_graphs.replays > 3
    assert tokens == reference


def test_triton_eager_matches_reference_path(tiny_model_dir, reference):
    _, tokens = _run(tiny_model_dir, PROMPTS, dtype="float32", attention_backend="triton", enforce_eager=True)
    assert tokens == reference


def test_reference_path_matches_hf_on_gpu(tiny_model_dir, reference):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from workers.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    gen = GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, ours in zip(PROMPTS, reference):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        assert out[0, ids.shape[1]:].tolist() == ours


def test_bf16_dummy_qwen3_runs_with_graphs_and_chunked_prefill():
    from cluster import LLM, SamplingParams

    llm = LLM("Qwen/Qwen3-0.6B", load_format="dummy", max_model_len=1024, max_num_seqs=32,
              max_num_batched_tokens=256, gpu_memory_utilization=0.3)
    assert llm.engine.worker.runner.dtype == torch.bfloat16
    prompts = [[(i * 7 + j) % 5000 for j in range(40 + 30 * i)] for i in range(12)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
    again = llm.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)
    assert all(o.metrics.num_cached_tokens > 0 for o in again), "the prompts should come from the prefix cache"
    llm.engine.scheduler.block_manager.check_no_leaks()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_multi_step_passes_replay_decode_graphs_and_match_reference_path(tiny_model_dir, reference,
                                                                         async_scheduling):
    # each pass takes its input token from the pass before on the device, through the graph's fill
    llm, tokens = _run(tiny_model_dir, PROMPTS, dtype="float32", attention_backend="triton",
                       num_scheduler_steps=4, async_scheduling=async_scheduling)
    assert llm.engine.worker.runner.decode_graphs is not None
    assert tokens == reference


def _prefix_hits(model_dir, **kwargs):
    """One prompt, then prompts that share its first 96 tokens with 1 to 20 new ones each, one at a
    time so each is a prefix-cache hit: queries of 2 to MAX_QUERY_ROWS (8) tokens run as decode rows."""
    from cluster import LLM, SamplingParams

    llm = LLM(str(model_dir), device="cuda", num_gpu_blocks=512, block_size=16, max_model_len=512,
              max_num_seqs=16, enable_prefix_caching=True, dtype="float32", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prefix = [(7 * j) % 5000 + 3 for j in range(96)]
    tokens = []
    for n in (8, 1, 4, 8, 16, 20):
        out = llm.generate([prefix + [(11 * n + j) % 5000 + 1 for j in range(n)]], params, use_tqdm=False)[0]
        tokens.append(out.outputs[0].token_ids)
        assert out.metrics.num_cached_tokens == (0 if not tokens[:-1] else 96)
    llm.engine.scheduler.block_manager.check_no_leaks()
    return llm, tokens


def test_prefix_hits_as_decode_rows_match_reference_path(tiny_model_dir):
    _, expected = _prefix_hits(tiny_model_dir, attention_backend="torch", enforce_eager=True)
    llm, tokens = _prefix_hits(tiny_model_dir, attention_backend="triton")
    graphs = llm.engine.worker.runner.decode_graphs
    assert graphs.query_row_steps == 2, "the hits of 4 and 8 new tokens run as rows (1 is a decode; 16, 20 prefill)"
    assert tokens == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_steps_from_another_thread_run_on_the_workers_gpu():
    """A Ray actor runs its methods on several threads, and the current CUDA device is per thread.
    A worker on GPU 1 stepped from a fresh thread (current device 0) must still launch its Triton
    kernels there: tensor-parallel ranks > 0 died on this ("cannot be accessed from Triton")."""
    import threading

    from cluster import LLM, SamplingParams

    torch.cuda.set_device(1)  # the worker takes the current device, as a TP rank takes its own
    try:
        llm = LLM("Qwen/Qwen3-0.6B", load_format="dummy", max_model_len=512, max_num_seqs=8,
                  gpu_memory_utilization=0.3)
    finally:
        torch.cuda.set_device(0)
    assert llm.engine.worker.device == torch.device("cuda", 1)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = {}

    def step_elsewhere():
        try:
            results["outs"] = llm.generate([[5, 6, 7] * 20, [9] * 3], params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - reported below
            results["error"] = e

    thread = threading.Thread(target=step_elsewhere)
    thread.start()
    thread.join()
    assert "error" not in results, results.get("error")
    assert [len(o.outputs[0].token_ids) for o in results["outs"]] == [8, 8]
