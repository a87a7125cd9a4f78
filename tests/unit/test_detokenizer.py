"""IncrementalDetokenizer against the real Qwen3 tokenizer (built offline from qwen.tiktoken)."""
import pytest

from scheduler.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "你好，世界！今天天气很好。",
    "Family: 👨‍👩‍👧 and flags 🇺🇸🇯🇵🏳️‍🌈, skin tone 👋🏽, plus ½ café naïve",
    "混合 mixed 文本 with emoji 🎉🎉 and 日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return x ** 2  # ∑ → ∞\n",
]


@pytest.fixture(scope="module")
def tok():
    from workers.tokenizer import load_tokenizer

    return load_tokenizer("Qwen/Qwen3-0.6B")


def stream(tok, ids, chunk=1, **kwargs):
    """Feed ids `chunk` at a time; return (deltas, detokenizer) with the final flush included."""
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), **kwargs)
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(detok.append(ids[i:i + chunk]))
        if detok.is_finished:
            break
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_full_decode(tok, text, chunk):
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids, chunk)
    assert "".join(d.text for d in deltas) == tok.decode(ids) == text
    assert detok.text == text
    assert all("\ufffd" not in d.text for d in deltas)


def test_multibyte_chars_are_split_across_tokens(tok):
    # the point of the test: the tokenizer really does split these characters mid-UTF-8
    ids = tok.encode("👨‍👩‍👧🇺🇸")
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)
    deltas, _ = stream(tok, ids)
    assert [d.text for d in deltas if d.text]  # something came out
    assert "".join(d.text for d in deltas) == "👨‍👩‍👧🇺🇸"
    # nothing is emitted while a character is incomplete
    assert any(d.text == "" for d in deltas[:-1])


def test_incomplete_tail_is_flushed_at_the_end(tok):
    ids = tok.encode("ok 👨")
    truncated = ids[:-1] if "\ufffd" in tok.decode(ids[:-1]) else None
    if truncated is None:
        pytest.skip("emoji is a single token here")
    deltas, detok = stream(tok, truncated)
    assert "".join(d.text for d in deltas) == tok.decode(truncated)


def test_stop_string_across_tokens_is_truncated(tok):
    text = "The answer is 42. STOP HERE and more text after"
    ids = tok.encode(text)
    assert not any("STOP HERE" in tok.decode([i]) for i in ids)  # the stop string spans tokens
    deltas, detok = stream(tok, ids, stop=["STOP HERE"])
    assert "".join(d.text for d in deltas) == "The answer is 42. "
    assert detok.text == "The answer is 42. "
    assert detok.stop_str == "STOP HERE" and detok.is_finished
    assert [d.stop_str for d in deltas if d.stop_str] == ["STOP HERE"]
    assert detok.append(tok.encode(" more")).text == ""  # later tokens are ignored


def test_stop_string_included(tok):
    ids = tok.encode("The answer is 42. STOP HERE and more")
    deltas, detok = stream(tok, ids, stop=["STOP HERE"], include_stop_str_in_output=True)
    assert "".join(d.text for d in deltas) == "The answer is 42. STOP HERE"
    assert detok.text == "The answer is 42. STOP HERE"


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_chinese_stop_string(tok, chunk):
    ids = tok.encode("你好，世界！今天天气很好。")
    deltas, detok = stream(tok, ids, chunk, stop=["天气"])
    assert "".join(d.text for d in deltas) == "你好，世界！今天"
    assert detok.stop_str == "天气"


def test_partial_stop_prefix_is_held_then_released(tok):
    ids = tok.encode("a STO and then STOP")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    out = ""
    for i in ids:
        delta = detok.append([i])
        out += delta.text
        assert not out.endswith(" ST") and not out.endswith(" STO")  # held while undecided
        if detok.is_finished:
            break
    assert out == "a STO and then "
    assert detok.stop_str == "STOP"


def test_held_prefix_released_on_finish(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.append(tok.encode("ends with ST")).text == "ends with "  # "ST" may start "STOP"
    assert detok.flush() == ("ST", None)
    assert detok.text == "ends with ST" and detok.stop_str is None


def test_first_completed_stop_string_wins_regardless_of_chunking(tok):
    ids = tok.encode("xx abcd yy")
    for chunk in (1, 100):
        deltas, detok = stream(tok, ids, chunk, stop=["abcd", "c"])
        assert "".join(d.text for d in deltas) == "xx ab"
        assert detok.stop_str == "c"


def test_skip_special_tokens(tok):
    ids = tok.encode("<think>\nhmm\n</think>\n\nHello<|im_end|>")
    assert 151645 in ids
    kept, _ = stream(tok, ids, skip_special_tokens=False)
    assert "".join(d.text for d in kept) == "<think>\nhmm\n</think>\n\nHello<|im_end|>"
    skipped, _ = stream(tok, ids, skip_special_tokens=True)
    # <think> is an added but non-special token in Qwen3, so it stays; <|im_end|> goes
    assert "".join(d.text for d in skipped) == "<think>\nhmm\n</think>\n\nHello"


def test_stop_token_terminated_drops_the_stop_token(tok):
    ids = tok.encode("Hello<|im_end|>")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    out = detok.append(ids[:-1]).text + detok.append(ids[-1:], stop_token_terminated=True).text
    assert out == "Hello" and detok.is_finished
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False, include_stop_str_in_output=True)
    assert detok.append(ids, stop_token_terminated=True).text == "Hello<|im_end|>"


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("前面的内容 🎉")
    ids = tok.encode("后面")
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.append(ids).text + detok.flush().text == "后面"


def test_random_unicode_streams(tok):
    import random

    rng = random.Random(0)
    pool = list("abc xyz,.!\n你好世界天气日本語한국어éüß½€") + ["👨‍👩‍👧", "🇺🇸", "🏳️‍🌈", "👋🏽", "🎉", "𝔘𝔫𝔦"]
    for _ in range(30):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text)
        deltas, _ = stream(tok, ids, chunk=rng.randint(1, 4))
        assert "".join(d.text for d in deltas) == tok.decode(ids)
        assert all("\ufffd" not in d.text for d in deltas)


def test_each_call_decodes_a_short_window(tok):
    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    ids = tok.encode("长文本 long text 🎉 " * 200)
    detok = IncrementalDetokenizer(counting, tok.encode(PROMPT))
    for i in ids:
        detok.append([i])
    detok.flush()
    assert detok.text == tok.decode(ids)
    assert counting.longest <= 12  # prompt context + a few tokens, never the whole output


def test_a_plain_fast_tokenizer_decodes_through_its_backend_with_the_same_text(tok):
    """The streamed path calls the Rust backend's decode straight away (two decodes a token, each
    ~2 us less): it must give transformers' decode's text, special tokens skipped or kept."""
    from scheduler.detokenizer import _decoder

    decode = _decoder(tok)
    assert decode == tok.backend_tokenizer.decode
    ids = tok.encode(PROMPT + "".join(TEXTS)) + [tok.convert_tokens_to_ids("<|im_end|>"), 151643, 151667]
    for skip in (True, False):
        for start in range(0, len(ids), 7):
            window = ids[start:start + 9]
            assert decode(window, skip_special_tokens=skip) == tok.decode(window, skip_special_tokens=skip)


def test_other_tokenizers_keep_their_own_decode(tok):
    import copy

    from scheduler.detokenizer import _decoder

    cleaning = copy.copy(tok)
    cleaning.clean_up_tokenization_spaces = True  # transformers may rewrite the backend's text
    assert _decoder(cleaning) == cleaning.decode

    class OwnDecode:  # a class with a decode of its own, backend or not
        backend_tokenizer = tok.backend_tokenizer
        clean_up_tokenization_spaces = False
        calls = 0

        def decode(self, ids, skip_special_tokens=True):
            self.calls += 1
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    own = OwnDecode()
    assert _decoder(own) == own.decode
    detok = IncrementalDetokenizer(own, tok.encode(PROMPT))
    assert detok.append(tok.encode("hi")).text == "hi" and own.calls == 3  # the prompt context, then two windows

    class Bare:  # decode held on the instance, none on the class
        backend_tokenizer = tok.backend_tokenizer
        clean_up_tokenization_spaces = False

    bare = Bare()
    bare.decode = tok.decode
    assert _decoder(bare) == tok.decode
