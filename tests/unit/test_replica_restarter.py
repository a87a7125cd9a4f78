"""ReplicaRestarter without Ray: retries with back-off, one start per lost replica, hold and stop."""
import threading
import time
from types import SimpleNamespace

from cluster.engine_core import Replica
from cluster.replica_restarter import ReplicaRestarter

WAIT_S = 5.0


class FakeExecutor:
    def __init__(self):
        self.shut_down = False

    def shutdown(self, wait: bool = False) -> None:
        self.shut_down = True


class Starts:
    """start_replica that fails its first `failures` calls per replica, then returns a new replica."""

    def __init__(self, failures: int = 0, gate: threading.Event | None = None):
        self.failures = failures
        self.gate = gate  # when given, each start waits for it
        self.calls: dict[int, int] = {}
        self.made: list = []  # every replica returned
        self.lock = threading.Lock()

    def __call__(self, replica_id: int):
        if self.gate is not None:
            self.gate.wait(WAIT_S)
        with self.lock:
            n = self.calls[replica_id] = self.calls.get(replica_id, 0) + 1
        if n <= self.failures:
            raise RuntimeError("no node has room")
        self.made.append(SimpleNamespace(executor=FakeExecutor(), num_blocks=8))
        return self.made[-1]


class Started:
    def __init__(self):
        self.replicas: dict[int, object] = {}
        self.event = threading.Event()

    def __call__(self, replica_id: int, started) -> None:
        self.replicas[replica_id] = started
        self.event.set()


def lost(replica_id: int) -> Replica:
    return Replica(replica_id, scheduler=None, executor=None)


def test_a_failing_start_is_retried_with_back_off_until_it_succeeds():
    starts, started = Starts(failures=2), Started()
    restarter = ReplicaRestarter(starts, started, num_replicas=1, backoff_s=(0.1, 0.2))
    t0 = time.monotonic()
    restarter.restart_lost([lost(0), Replica(1, scheduler=None, executor=FakeExecutor())])
    assert started.event.wait(WAIT_S)
    assert time.monotonic() - t0 >= 0.3  # waited 0.1 s after the first failure, 0.2 s after the second
    assert starts.calls == {0: 3}  # two failures, then a start; the live replica 1 is left alone
    assert list(started.replicas) == [0]
    restarter.stop()


def test_a_replica_being_started_is_not_started_twice_until_revived():
    gate = threading.Event()
    starts, started = Starts(gate=gate), Started()
    restarter = ReplicaRestarter(starts, started, num_replicas=2)
    replica = lost(0)
    restarter.restart_lost([replica])
    restarter.restart_lost([replica])  # the step thread asks again before the first start ends
    gate.set()
    assert started.event.wait(WAIT_S)
    assert starts.calls == {0: 1}
    restarter.restart_lost([replica])  # started but not yet revived on the step thread
    restarter.revived(0)
    started.event.clear()
    restarter.restart_lost([replica])  # lost again after its revival: a new start
    assert started.event.wait(WAIT_S)
    assert starts.calls == {0: 2}
    restarter.stop()


def test_held_down_replicas_are_not_started():
    starts, started = Starts(), Started()
    restarter = ReplicaRestarter(starts, started, num_replicas=1)
    restarter.enabled = False
    restarter.restart_lost([lost(0)])
    restarter.stop()
    assert starts.calls == {}
    assert not started.replicas


def test_stop_ends_the_retries_and_releases_a_start_that_finishes_after_it():
    failing = ReplicaRestarter(Starts(failures=10**6), Started(), num_replicas=1, backoff_s=(30.0,))
    failing.restart_lost([lost(0)])
    gate = threading.Event()
    starts, started = Starts(gate=gate), Started()
    slow = ReplicaRestarter(starts, started, num_replicas=1)
    slow.restart_lost([lost(0)])
    failing.stop()  # wakes the 30 s back-off sleep: its thread ends at once
    slow.stop()
    gate.set()  # the start in progress finishes after stop
    t0 = time.monotonic()
    failing._pool.shutdown(wait=True)
    slow._pool.shutdown(wait=True)
    assert time.monotonic() - t0 < WAIT_S
    assert not started.replicas  # not handed on to a stopped actor,
    assert [r.executor.shut_down for r in starts.made] == [True]  # and its actors released
    slow.restart_lost([lost(1)])  # the step thread may still ask once after stop: nothing starts
    slow._stopped.clear()  # as if it had checked just before stop() shut the pool
    slow.restart_lost([lost(2)])  # the shut pool refuses the start; the step thread carries on
    assert starts.calls == {0: 1}
