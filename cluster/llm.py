"""The offline API: LLM(model, ...).generate(prompts) and .chat(messages), as in vLLM."""
from typing import Any, Sequence

from tqdm import tqdm

from cluster.config import EngineConfig
from cluster.llm_engine import LLMEngine
from cluster.outputs import RequestOutput
from scheduler.errors import InvalidRequestError
from scheduler.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate offline. Keyword arguments are the flat engine options of ray_config.yaml."""

    def __init__(self, model: str = "Qwen/Qwen3-0.6B", **engine_args: Any):
        self.config = EngineConfig.from_flat(model=model, **engine_args)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine (and the Ray actors of a data/tensor parallel one)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. prompts: a string, strings, token ids, or lists of token ids."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = self.engine.add_requests(prompts, params)  # all or none
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, enable_thinking: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or several, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=enable_thinking)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        # no bar at all without use_tqdm: even a disabled one cost ~30 us a call (a single
        # request's generate is a few ms)
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        num_output_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            num_output_tokens += sum(len(c.token_ids) for c in out.outputs)
                            bar.update(1)
                            elapsed = bar.format_dict["elapsed"] or 1e-9
                            bar.set_postfix_str(f"output: {num_output_tokens / elapsed:.1f} tok/s")
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("prompts", "must hold at least one prompt")
    if isinstance(prompts[0], int) and not isinstance(prompts[0], bool):
        return [prompts]  # one prompt of token ids; the engine checks every id
    for p in prompts:
        if not isinstance(p, (str, list)):
            raise InvalidRequestError("prompts", f"each must be a string or a list of token ids, got {type(p).__name__}")
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError("sampling_params", f"needs one per prompt ({n}), got {len(params)}")
    return params
