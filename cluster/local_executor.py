"""The in-process executor: one replica's Worker in this process, for a single-replica engine."""
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from workers.worker import Worker


class _Done:
    def __init__(self, output: ModelRunnerOutput):
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class LocalExecutor:
    overlaps_steps = False  # the step runs inside submit: nothing to overlap with

    def __init__(self, worker: Worker):
        self.worker = worker

    def submit(self, step: SchedulerOutput) -> _Done:
        return _Done(self.worker.execute_model(step))

    def shutdown(self) -> None:
        pass
