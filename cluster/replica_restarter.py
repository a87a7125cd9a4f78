"""ReplicaRestarter: starts a lost replica's actors again, off the scheduler actor's step thread.

Starting a replica (placement group, workers, model load, graph capture) takes seconds to minutes
and may fail while the cluster has no room (a node is being replaced), so it runs on a thread pool
and retries with back-off. Each replica started is handed to on_started, which queues its revival
for the step thread: the EngineCore is touched only there.
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cluster.engine_core import Replica
from cluster.launcher import StartedReplica

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # before the 1st, 2nd, ... retry; the last repeats


class ReplicaRestarter:
    def __init__(self, start_replica: Callable[[int], StartedReplica],
                 on_started: Callable[[int, StartedReplica], None], num_replicas: int,
                 backoff_s: tuple[float, ...] = RESTART_BACKOFF_S):
        self.start_replica = start_replica  # replica id -> its new actors, or raises
        self.on_started = on_started  # called on a pool thread
        self.backoff_s = backoff_s
        self.enabled = True  # operators hold lost replicas down while False (set_auto_restart)
        self._restarting: set[int] = set()  # step thread
        self._stopped = threading.Event()  # also cuts a back-off sleep short
        self._pool = ThreadPoolExecutor(max(1, num_replicas), thread_name_prefix="folovllm-restart")

    def restart_lost(self, replicas: list[Replica]) -> None:
        """Step thread: start every lost replica not already being started."""
        if not self.enabled or self._stopped.is_set():
            return
        for replica in replicas:
            if not replica.live and replica.replica_id not in self._restarting:
                try:
                    self._pool.submit(self._restart, replica.replica_id)
                except RuntimeError:  # stop() shut the pool since the check above (another thread)
                    return
                self._restarting.add(replica.replica_id)

    def revived(self, replica_id: int) -> None:
        """Step thread: the replica is live again; a later loss restarts it again."""
        self._restarting.discard(replica_id)

    def stop(self) -> None:
        """No more attempts: a start in progress finishes and releases what it started."""
        self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _restart(self, replica_id: int) -> None:
        attempt = 0
        while not self._stopped.is_set():
            try:
                started = self.start_replica(replica_id)
            except Exception:  # noqa: BLE001 - e.g. the node is gone and no other has room yet
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                logger.exception("replica %d: restart failed; retrying in %.0fs", replica_id, delay)
                attempt += 1
                self._stopped.wait(delay)
                continue
            if self._stopped.is_set():
                started.executor.shutdown(wait=True)
            else:
                self.on_started(replica_id, started)
            return
