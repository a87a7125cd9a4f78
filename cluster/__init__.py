"""folovllm's cluster side: the offline LLM API, Ray actors, gRPC and Ray Serve."""
from scheduler.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch; importing `cluster` for the gRPC client alone should not
    if name == "LLM":
        from cluster.llm import LLM

        return LLM
    raise AttributeError(name)
