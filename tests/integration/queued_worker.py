"""A no-op worker that models a device queue, for timing-free tests of when steps are launched.

Each step runs STEP_S after the one before it ends (as steps queue on a GPU stream), and the
worker logs every launch: (time.monotonic(), step_id, ids of the sequences it starts).
"""
import time

from workers.worker_actor import NoopWorkerActor

STEP_S = 0.1


class QueuedStepsWorker(NoopWorkerActor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._done_at = 0.0  # when the newest launched step ends
        self.launches: list[tuple[float, int, list[str]]] = []

    def execute_model(self, step):
        had_prev, prev_done = self._inflight is not None, self._done_at
        if step is not None:
            now = time.monotonic()
            self.launches.append((now, step.step_id, [r.req_id for r in step.scheduled_new_reqs]))
            self._done_at = max(now, prev_done) + STEP_S
        if had_prev:  # the reply is the step before's output: there once that step has ended
            time.sleep(max(0.0, prev_done - time.monotonic()))
        return super().execute_model(step)

    def launch_log(self) -> list[tuple[float, int, list[str]]]:
        return list(self.launches)
