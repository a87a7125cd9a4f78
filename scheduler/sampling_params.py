"""SamplingParams: how one request is sampled and when it stops. Validated on construction."""
from dataclasses import dataclass, field, fields

from scheduler.errors import InvalidRequestError

_INT_MAX = 2**63 - 1


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise InvalidRequestError(name, f"must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """Sampling and stopping controls, named as in vLLM. temperature=0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN

        _check(is_int(self.n) and 1 <= self.n <= 128, "n", "an integer in [1, 128]", self.n)
        _check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
               "temperature", "a number in [0, 100] (0 means greedy)", self.temperature)
        _check(is_int(self.top_k) and self.top_k >= 0, "top_k",
               "an integer >= 1, or 0 / -1 to disable", self.top_k)
        _check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]", self.top_p)
        _check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]", self.min_p)
        _check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
               "repetition_penalty", "a number in (0, 10]", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(is_num(value) and -2.0 <= value <= 2.0, name, "a number in [-2, 2]", value)
        _check(self.seed is None or (is_int(self.seed) and 0 <= self.seed <= _INT_MAX),
               "seed", f"null or an integer in [0, {_INT_MAX}]", self.seed)
        _check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", "null or an integer >= 1", self.max_tokens)
        _check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 32,
               "stop", "a list of at most 32 non-empty strings", self.stop)
        _check(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, "a boolean", getattr(self, name))
        _check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               "logprobs", "null or an integer in [0, 20]", self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids a caller names must exist; checked where the vocabulary is known."""
        for t in self.stop_token_ids:
            _check(t < vocab_size, "stop_token_ids", f"ids in [0, {vocab_size})", t)

    def clone(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)
