"""Multi-step decoding on the worker (SchedulerOutput.decode_steps = k > 1).

One scheduled step becomes k forward passes, launched back to back: a sequence with n scheduled
tokens takes part in the first n, and each pass feeds it the token the pass before sampled, on
the device (the same path that feeds a step launched before its predecessor was collected). The
host schedules, sends and collects once per k tokens, which is what a scheduler driving many
replicas is short of.
"""
from dataclasses import replace

from scheduler.output import CachedRequestData, ModelRunnerOutput, SchedulerOutput


def split_passes(step: SchedulerOutput) -> list[SchedulerOutput]:
    """The k one-token-a-sequence steps that run `step`. Pass 0 carries its diffs (the blocks for
    every pass, the finished ids); pass j only moves each remaining sequence on by j tokens."""
    counts = step.num_scheduled_tokens
    starts = {new.req_id: new.num_computed_tokens for new in step.scheduled_new_reqs}
    cached = step.scheduled_cached_reqs
    starts.update(zip(cached.req_ids, cached.num_computed_tokens))
    passes = [replace(step, num_scheduled_tokens=dict.fromkeys(counts, 1), total_num_scheduled_tokens=len(counts),
                      decode_steps=1)]
    for j in range(1, step.decode_steps):
        ids = [r for r, n in counts.items() if n > j]
        passes.append(SchedulerOutput(step.step_id, [], CachedRequestData(ids, [[] for _ in ids],
                                                                          [starts[r] + j for r in ids]),
                                      dict.fromkeys(ids, 1), len(ids)))
    return passes


class MultiStepHandle:
    """The launched passes of one multi-step, seen as one step: result() has every sequence's
    tokens in pass order, and the next step takes each sequence's input from its last pass."""

    def __init__(self, runner, handles: list):
        self.runner, self.handles = runner, handles

    @property
    def collected(self) -> bool:
        return all(h.collected for h in self.handles)

    def token_source(self, req_ids: list[str], positions: list[int], to_device):
        """fill(input_ids) of StepHandle.token_source, each token from the last pass that sampled it."""
        groups: dict[int, tuple[list, list]] = {}
        for req_id, position in zip(req_ids, positions):
            last = next(i for i in range(len(self.handles) - 1, -1, -1) if req_id in self.handles[i].row_of)
            ids, where = groups.setdefault(last, ([], []))
            ids.append(req_id)
            where.append(position)
        fills = [self.handles[i].token_source(ids, where, to_device) for i, (ids, where) in groups.items()]

        def fill(input_ids):
            for f in fills:
                f(input_ids)
        return fill

    def result(self) -> ModelRunnerOutput:
        outputs = [h.result() for h in self.handles]
        first = outputs[0]
        tokens = {req_id: list(t) for req_id, t in zip(first.req_ids, first.sampled_token_ids)}
        for out in outputs[1:]:
            for req_id, t in zip(out.req_ids, out.sampled_token_ids):
                tokens[req_id].extend(t)
        if self.runner is not None and self.runner._inflight is self:
            self.runner._inflight = None
        self.runner = None
        return ModelRunnerOutput(first.req_ids, [tokens[r] for r in first.req_ids], first.logprobs)
