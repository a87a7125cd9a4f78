"""Incremental detokenizer: sampled token ids in, text deltas out, stop strings applied.

Pure Python; the tokenizer is injected and only its transformers-style
decode(ids, skip_special_tokens=...) is used (or, for a plain transformers fast tokenizer, the
Rust backend's decode that it wraps: see _decoder).

Decoding follows vLLM / HF TextStreamer: each call decodes only a short window,
ids[prefix_offset:], and the new text is what that window adds to decode(ids[prefix_offset:read_offset]).
A byte-level BPE token can end part-way through a UTF-8 character; decode then ends in U+FFFD,
and we hold the tokens back until a later token completes the character.

Stop strings: text whose end could still grow into a stop string is held back until the next
tokens decide it; on a match the output ends before the stop string (or after it, with
include_stop_str_in_output) and later tokens are ignored. The match reported is the one the
stream completes first, so the result does not depend on how the tokens were chunked.
"""
from collections.abc import Sequence
from typing import NamedTuple

# Prompt tokens decoded as context before the output, as vLLM does: with tokenizers that render
# a token differently at the start of a text (SentencePiece drops the leading space) the first
# output tokens then read as they do in context. Byte-level BPE (Qwen) renders the same either way.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 sequence


# transformers' own decode methods: a tokenizer class that overrides neither adds nothing to the
# backend's text but the space clean-up (v5 names its fast tokenizer TokenizersBackend, v4
# PreTrainedTokenizerFast)
_PLAIN_DECODE = {"PreTrainedTokenizerBase.decode"}
_PLAIN_FAST_DECODE = {"TokenizersBackend._decode", "PreTrainedTokenizerFast._decode"}


def _decoder(tokenizer):
    """decode(ids, skip_special_tokens) for the tokenizer: its Rust backend's decode where that
    gives the same text, else tokenizer.decode. transformers' decode checks and converts its
    arguments in Python before calling the backend (2.2-2.7 us against 0.5-0.7 for the call
    itself), and a streamed token costs two decodes. The same text needs the class's decode and
    _decode to be transformers' own and no space clean-up after the backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    if (backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) is not False
            or getattr(getattr(cls, "decode", None), "__qualname__", "") not in _PLAIN_DECODE
            or getattr(getattr(cls, "_decode", None), "__qualname__", "") not in _PLAIN_FAST_DECODE):
        return tokenizer.decode
    return backend.decode


class DetokenizerDelta(NamedTuple):
    text: str  # output text new since the last call
    stop_str: str | None = None  # the stop string that ended the output in this call, if any


class IncrementalDetokenizer:
    """One sequence's output text, built token by token."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self._decode_ids = _decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # proper prefixes of the stop strings: output ending in one may yet become a stop string
        self._stop_prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)

        self._token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(0, self._read_offset)
        if self._prefix_text.endswith(_REPLACEMENT):
            # the prompt ends inside a character: decode the output on its own instead
            self._prefix_offset, self._prefix_text = self._read_offset, ""

        self._output = ""  # decoded output, including the held-back tail
        self._num_released = 0  # chars of _output already returned
        self.stop_str: str | None = None  # the stop string that ended the output
        self.is_finished = False

    @property
    def text(self) -> str:
        """The output text returned so far (all of it once finished)."""
        return self._output[:self._num_released]

    def append(self, new_token_ids: Sequence[int], finished: bool = False,
               stop_token_terminated: bool = False) -> DetokenizerDelta:
        """Add sampled tokens; return the text they complete. finished: the sequence ended with
        these tokens, so flush held-back text. stop_token_terminated: it ended on a stop token
        (EOS or stop_token_ids), the last id, which is left out of the text unless
        include_stop_str_in_output (as vLLM)."""
        if self.is_finished:
            return DetokenizerDelta("")
        if stop_token_terminated:
            finished = True
            if not self.include_stop_str_in_output:
                new_token_ids = new_token_ids[:-1]
        self._token_ids.extend(new_token_ids)
        num_checked = len(self._output)
        self._output += self._decode_new(flush=finished)

        match = self._find_stop(num_checked) if self.stop else None
        if match is not None:
            start, stop_str = match
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            self._output = self._output[:end]
            self.stop_str, self.is_finished = stop_str, True
            return DetokenizerDelta(self._release(end), stop_str)
        if finished:
            self.is_finished = True
            return DetokenizerDelta(self._release(len(self._output)))
        return DetokenizerDelta(self._release(len(self._output) - self._held_back()))

    def flush(self) -> DetokenizerDelta:
        """The sequence ended: return everything still held back."""
        return self.append((), finished=True)

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, flush: bool) -> str:
        """Text the tokens past read_offset add, or "" while they end inside a character."""
        if self._read_offset == len(self._token_ids):
            return ""
        text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(text) <= len(self._prefix_text):
            return ""  # e.g. only skipped special tokens so far; the window keeps them
        if text.endswith(_REPLACEMENT) and not flush:
            return ""  # the last token ends part-way through a UTF-8 character
        new_text = text[len(self._prefix_text):]
        if flush:  # the sequence ends here (append marks it finished): no later window follows
            return new_text
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new_text

    def _find_stop(self, num_checked: int) -> tuple[int, str] | None:
        """The stop string completed first in the text past num_checked, as (start, stop string);
        of two completed at the same char, the longer."""
        best = None  # (end, start, stop string)
        for s in self.stop:
            # text before num_checked held no match, so one must end past it
            start = self._output.find(s, max(0, num_checked - len(s) + 1))
            if start != -1 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        return None if best is None else (best[1], best[2])

    def _held_back(self) -> int:
        """Length of the longest unreleased suffix that could still become a stop string."""
        if self.include_stop_str_in_output:
            return 0  # a stop string's start is output whether or not it completes
        longest = min(self._max_hold, len(self._output) - self._num_released)
        for k in range(longest, 0, -1):
            if self._output[-k:] in self._stop_prefixes:
                return k
        return 0

    def _release(self, end: int) -> str:
        delta = self._output[self._num_released:end]
        self._num_released = max(self._num_released, end)
        return delta
