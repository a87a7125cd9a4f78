"""The in-process executor: one replica's Worker in this process, for a single-replica engine."""
from scheduler.output import SchedulerOutput
from workers.model_runner import StepHandle
from workers.worker import Worker


class LocalExecutor:
    # submit enqueues the step on the device and returns: the next step is prepared while it runs
    overlaps_steps = True

    def __init__(self, worker: Worker):
        self.worker = worker

    def submit(self, step: SchedulerOutput) -> StepHandle:
        return self.worker.launch(step)

    def shutdown(self) -> None:
        pass
