"""Greedy output of the whole in-process engine equals HuggingFace transformers' Qwen3, and stays
equal under every scheduling feature: prefix caching, chunked prefill, preemption, batching, n > 1."""
import numpy as np
import pytest
import torch

from cluster import LLM, SamplingParams

NUM_NEW = 32
# 8 prompts of different lengths (in tokens: 1 to ~70), some sharing prefixes
PROMPTS = [
    "Hi",
    "The capital of France is",
    "你好，世界！今天天气怎么样？",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "The quick brown fox jumps over the lazy dog. " * 3 + "And then it",
    "🦊 emoji 👨‍👩‍👧 and numbers 1234567890",
    "A long prompt " + " ".join(str(i) for i in range(40)),
]


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": NUM_NEW, "ignore_eos": True, **overrides})


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from workers.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=NUM_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def make_llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("num_gpu_blocks", 256)
    kwargs.setdefault("block_size", 4)
    return LLM(str(model_dir), dtype="float32", device="cpu", **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def check_no_leaks(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    llm.engine.scheduler.block_manager.check_no_leaks()


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


def test_greedy_matches_hf_batched(llm, hf_reference):
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outs) == hf_reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    for o in outs:  # text is decoded once at the end offline; it must equal the full decode
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    check_no_leaks(llm)


def test_greedy_matches_hf_one_at_a_time(llm, hf_reference):
    alone = [llm.generate(p, greedy(), use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == hf_reference
    check_no_leaks(llm)


def test_logits_close_to_hf(llm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    params = greedy(logprobs=5, max_tokens=4)
    out = llm.generate(PROMPTS[4], params, use_tqdm=False)[0].outputs[0]
    prompt_ids = llm.tokenizer.encode(PROMPTS[4], add_special_tokens=False)
    ids = torch.tensor([prompt_ids + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for step, lp in enumerate(out.logprobs):
        row = ref[len(prompt_ids) - 1 + step]
        top = torch.topk(row, 5)
        assert lp.top_token_ids == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(lp.top_logprobs), top.values, atol=1e-4, rtol=1e-4)
        assert lp.logprob == pytest.approx(row[out.token_ids[step]].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs), abs=1e-6)


@pytest.mark.parametrize("variant", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=7),  # chunked prefill: every prompt is split, decodes share the budget
    dict(num_gpu_blocks=40, max_model_len=160),  # preemption: too few blocks for the whole batch
    dict(max_num_seqs=2),
])
def test_scheduling_features_keep_greedy_output(tiny_model_dir, hf_reference, variant):
    llm = make_llm(tiny_model_dir, **variant)
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_reference
    if "num_gpu_blocks" in variant:
        assert llm.engine.scheduler.get_stats().num_preemptions > 0, "the tiny cache should force preemption"
    check_no_leaks(llm)


def test_prefix_cache_hit_keeps_output(llm, hf_reference):
    first = llm.generate(PROMPTS[4], greedy(), use_tqdm=False)[0]
    again = llm.generate(PROMPTS[4], greedy(), use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens > 0
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == hf_reference[4]
    check_no_leaks(llm)


def test_token_id_prompts_reach_the_prefix_cache_with_the_engines_packing(llm, hf_reference, monkeypatch):
    """The engine checks a prompt of ids and packs it in one go; the scheduler keys its prefix
    cache with that packing instead of packing the prompt again, and hits as with its own."""
    from scheduler import request

    def packed_again(token_ids):
        raise AssertionError("the scheduler packed a prompt that the engine had packed")

    ids = llm.tokenizer.encode(PROMPTS[4], add_special_tokens=False)
    monkeypatch.setattr(request, "pack_token_ids", packed_again)
    first, again = (llm.generate(ids, greedy(), use_tqdm=False)[0] for _ in range(2))
    assert again.metrics.num_cached_tokens > 0
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == hf_reference[4]
    check_no_leaks(llm)


def test_request_outputs_are_built_while_the_first_step_runs(llm, hf_reference, monkeypatch):
    """A request's RequestOutput and detokenizer are not needed to launch its first step: the
    engine builds them after the launch, before it waits for the step's tokens."""
    from workers.model_runner import StepHandle

    engine, built_at_collect = llm.engine, []
    result = StepHandle.result
    monkeypatch.setattr(StepHandle, "result", lambda self: built_at_collect.append(
        all(t.processor is not None for t in engine._tracked.values())) or result(self))
    request_ids = engine.add_requests(PROMPTS[1:3], [greedy(), greedy(n=2)])
    assert all(engine._tracked[r].processor is None for r in request_ids)
    outputs = llm._run(request_ids, use_tqdm=False)
    assert built_at_collect and all(built_at_collect)
    assert [o.outputs[0].token_ids for o in outputs] == hf_reference[1:3]
    assert [o.prompt_token_ids for o in outputs] == [llm.tokenizer.encode(p, add_special_tokens=False)
                                                     for p in PROMPTS[1:3]]
    assert outputs[0].outputs[0].text == llm.tokenizer.decode(hf_reference[1]) and len(outputs[1].outputs) == 2
    check_no_leaks(llm)


def test_n_siblings_share_prompt_and_match_greedy(llm, hf_reference):
    outs = llm.generate(PROMPTS[3:5], greedy(n=3), use_tqdm=False)
    for out, ref in zip(outs, hf_reference[3:5]):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == ref for c in out.outputs)
    check_no_leaks(llm)


def test_seeded_sampling_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True)] * 3
    batched = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[5]],
                           [others[0], others[1], params, others[2]], use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
    different = llm.generate(PROMPTS[1], params.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone
    check_no_leaks(llm)


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    roomy = make_llm(tiny_model_dir).generate(PROMPTS, params, use_tqdm=False)
    tight = make_llm(tiny_model_dir, num_gpu_blocks=40, max_model_len=160)
    assert token_ids(tight.generate(PROMPTS, params, use_tqdm=False)) == token_ids(roomy)
    assert tight.engine.scheduler.get_stats().num_preemptions > 0
    check_no_leaks(tight)


def test_stop_strings_and_tokens(llm, hf_reference):
    ref = hf_reference[1]
    text = llm.tokenizer.decode(ref)
    stop = text[len(text) // 3: len(text) // 3 + 3]
    out = llm.generate(PROMPTS[1], greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    out = llm.generate(PROMPTS[1], greedy(stop_token_ids=[ref[5]]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:ref.index(ref[5]) + 1] and out.stop_reason == ref[5]
    check_no_leaks(llm)


def test_prompt_forms_and_order(llm, hf_reference):
    ids = llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    assert llm.generate(ids, greedy(), use_tqdm=False)[0].outputs[0].token_ids == hf_reference[1]
    outs = llm.generate([ids, PROMPTS[2]], greedy(), use_tqdm=False)
    assert token_ids(outs) == [hf_reference[1], hf_reference[2]]
    assert outs[0].prompt_token_ids == ids and outs[1].prompt == PROMPTS[2]
    # ids of other integer types run as their values and come back as plain ints
    out = llm.generate([list(np.array(ids, dtype=np.int64))], greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_reference[1]
    assert out.prompt_token_ids == ids and all(type(t) is int for t in out.prompt_token_ids)
    assert llm.engine.tokenize(list(np.array(ids, dtype=np.int32))) == ids


def test_bad_requests_are_rejected_without_harm(llm, hf_reference):
    from scheduler.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate("word " * 600, greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.generate([[1, 2, 10**9]], greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate("x", greedy(stop_token_ids=[10**7]), use_tqdm=False)
    # all or none: the scheduler refuses the third prompt after admitting two; they go too
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate(PROMPTS[:2] + ["word " * 600], greedy(), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.scheduler.has_unfinished_requests()
    check_no_leaks(llm)
    assert token_ids(llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)) == hf_reference[:2]


def test_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], greedy(max_tokens=4), use_tqdm=False,
                   enable_thinking=False)[0]
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert prompt.startswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>\n\n</think>" in prompt
    assert len(out.outputs[0].token_ids) == 4


def test_async_scheduling_feeds_tokens_on_the_device_and_changes_nothing(tiny_model_dir, hf_reference, monkeypatch):
    from workers.model_runner import StepHandle

    fills = []
    token_source = StepHandle.token_source
    monkeypatch.setattr(StepHandle, "token_source",
                        lambda self, r, p, to_device: fills.append(len(r)) or token_source(self, r, p, to_device))
    llm = make_llm(tiny_model_dir, async_scheduling=True)
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_reference
    assert sum(fills) > 0, "decodes should take their input token from the step still in flight"
    check_no_leaks(llm)
    # sampling that reads its own history (penalties, min_tokens, seeds) waits for the step in flight
    mixed = [SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=12),
             SamplingParams(temperature=0.0, presence_penalty=1.0, min_tokens=6, max_tokens=12),
             greedy(max_tokens=12)]
    overlapped = llm.generate(PROMPTS[:4], mixed, use_tqdm=False)
    serial = make_llm(tiny_model_dir, async_scheduling=False).generate(PROMPTS[:4], mixed, use_tqdm=False)
    assert token_ids(overlapped) == token_ids(serial)
    check_no_leaks(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_multi_step_decoding_keeps_greedy_output(tiny_model_dir, hf_reference, async_scheduling, monkeypatch):
    from workers.model_runner import ModelRunner

    passes = []
    launch = ModelRunner.launch
    llm = make_llm(tiny_model_dir, num_scheduler_steps=4, async_scheduling=async_scheduling)
    with monkeypatch.context() as patch:
        patch.setattr(ModelRunner, "launch", lambda self, step: passes.append(step.decode_steps) or launch(self, step))
        assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_reference
    assert max(passes) == 4, "decode steps should run as 4 passes"
    check_no_leaks(llm)
    # sampling that reads its own history waits for the passes before it; a logprobs one takes one
    # token a step; a stop inside the passes ends the sequence there
    mixed = [SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=12),
             SamplingParams(temperature=0.0, presence_penalty=1.0, min_tokens=6, max_tokens=12),
             greedy(max_tokens=12, logprobs=2), greedy(max_tokens=9, stop_token_ids=[hf_reference[4][5]])]
    single_llm = make_llm(tiny_model_dir)
    text = single_llm.generate(PROMPTS[5], greedy(max_tokens=12), use_tqdm=False)[0].outputs[0].text
    mixed.append(greedy(max_tokens=12, stop=[text[len(text) // 2:len(text) // 2 + 3]]))  # ends mid-step
    multi = llm.generate(PROMPTS[:6], mixed, use_tqdm=False)
    single = single_llm.generate(PROMPTS[:6], mixed, use_tqdm=False)
    assert token_ids(multi) == token_ids(single)
    assert [o.outputs[0].text for o in multi] == [o.outputs[0].text for o in single]
    assert [o.outputs[0].finish_reason for o in multi] == [o.outputs[0].finish_reason for o in single]
    assert multi[5].outputs[0].finish_reason == "stop" and len(multi[5].outputs[0].token_ids) < 12
    assert len(multi[3].outputs[0].logprobs) == 12
    check_no_leaks(llm)


def test_multi_step_decoding_under_preemption_keeps_greedy_output(tiny_model_dir, hf_reference):
    llm = make_llm(tiny_model_dir, num_scheduler_steps=3, num_gpu_blocks=40, max_model_len=160,
                   async_scheduling=True)
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_reference
    assert llm.engine.scheduler.get_stats().num_preemptions > 0, "the tiny cache should force preemption"
    check_no_leaks(llm)


def test_startup_objects_are_frozen_out_of_collections(llm):
    """A ready engine's long-lived state is out of the collector's scans (workers/gc_freeze.py):
    a collection then costs only what was made since, not milliseconds inside a request."""
    import gc

    engine = llm.engine
    assert gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}
    assert id(engine.core) not in tracked and id(engine.worker.runner.__dict__) not in tracked
    gc.collect()  # collections still run for what is made after start-up
    assert llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids
