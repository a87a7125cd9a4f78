"""Scheduling order. A policy is a sort key: lower keys are admitted first and preempted last.

The same key orders the waiting heap and the running list, so the running list's tail is always
the preemption victim and a preempted sequence re-enters the waiting queue ahead of everything
that arrived after it (under fcfs, in practice the front).
"""
import heapq
from collections.abc import Callable, Iterator

from scheduler.request import Sequence

SortKey = Callable[[Sequence], tuple]


def fcfs_key(seq: Sequence) -> tuple:
    return (seq.arrival_time, seq.order)


def priority_key(seq: Sequence) -> tuple:
    # lower priority value first, then arrival; order breaks ties and keeps siblings in index order
    return (seq.priority, seq.arrival_time, seq.order)


POLICIES: dict[str, SortKey] = {"fcfs": fcfs_key, "priority": priority_key}


def get_policy(name: str) -> SortKey:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]


class WaitingQueue:
    """Sequences waiting for blocks and budget, lowest key first."""

    def __init__(self, key: SortKey):
        self.key = key
        self._heap: list[tuple[tuple, Sequence]] = []  # keys are unique (seq.order), so seqs never compare

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        """In no particular order."""
        return (seq for _, seq in self._heap)

    def push(self, seq: Sequence, front: bool = False) -> None:
        key = (float("-inf"), seq.order) if front else self.key(seq)
        heapq.heappush(self._heap, (key, seq))

    def peek(self) -> Sequence:
        return self._heap[0][1]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[1]

    def remove(self, seqs: set[Sequence]) -> None:
        """O(len(queue)); take many at once (an abort storm is one call, not one per sequence)."""
        if seqs:
            self._heap = [entry for entry in self._heap if entry[1] not in seqs]
            heapq.heapify(self._heap)

    def clear(self) -> list[Sequence]:
        seqs = [seq for _, seq in sorted(self._heap, key=lambda entry: entry[0])]
        self._heap = []
        return seqs
