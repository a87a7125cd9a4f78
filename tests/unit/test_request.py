import itertools

import pytest

from scheduler.request import IllegalTransitionError, Request, RequestStatus, Sequence
from scheduler.sampling_params import SamplingParams

S = RequestStatus
LEGAL = {
    (S.WAITING, S.RUNNING), (S.WAITING, S.FINISHED_STOPPED), (S.WAITING, S.FINISHED_ABORTED),
    (S.RUNNING, S.PREEMPTED), (S.RUNNING, S.FINISHED_STOPPED), (S.RUNNING, S.FINISHED_LENGTH),
    (S.RUNNING, S.FINISHED_ABORTED),
    (S.PREEMPTED, S.RUNNING), (S.PREEMPTED, S.FINISHED_STOPPED), (S.PREEMPTED, S.FINISHED_ABORTED),
}


def make_request(n: int = 1, prompt=(1, 2, 3), req_id: str = "r", **kwargs) -> Request:
    return Request(req_id, list(prompt), SamplingParams(n=n), **kwargs)


def seq_in(status: RequestStatus) -> Sequence:
    seq = make_request().seqs[0]
    path = {S.WAITING: [], S.RUNNING: [S.RUNNING], S.PREEMPTED: [S.RUNNING, S.PREEMPTED]}
    for step in path.get(status, [S.RUNNING, status]):
        seq.status = step
    assert seq.status is status
    return seq


@pytest.mark.parametrize("old,new", list(itertools.product(S, S)), ids=lambda s: s.name)
def test_transitions_enforced(old, new):
    seq = seq_in(old)
    if (old, new) in LEGAL:
        seq.status = new
        assert seq.status is new
    else:
        with pytest.raises(IllegalTransitionError, match=f"r#0: {old.name} -> {new.name}"):
            seq.status = new
        assert seq.status is old


def test_finished_statuses_and_reasons():
    assert [s for s in S if s.is_finished] == [S.FINISHED_STOPPED, S.FINISHED_LENGTH, S.FINISHED_ABORTED]
    assert [s.finish_reason for s in S] == [None, None, None, "stop", "length", "abort"]
    assert seq_in(S.FINISHED_LENGTH).is_finished and not seq_in(S.PREEMPTED).is_finished


def test_sequence_fields():
    req = make_request(prompt=[5, 6, 7, 8], priority=3, arrival_time=12.5)
    seq = req.seqs[0]
    assert seq.seq_id == "r#0" and seq.req_id == "r" and seq.index == 0
    assert (seq.priority, seq.arrival_time, seq.sampling_params) == (3, 12.5, req.sampling_params)
    assert seq.status is S.WAITING and seq.block_ids == [] and seq.stop_reason is None
    assert (seq.num_computed_tokens, seq.num_cached_tokens) == (0, 0)
    seq.output_token_ids += [9, 10]
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (4, 2, 6)
    assert seq.all_token_ids == [5, 6, 7, 8, 9, 10]


def test_token_slice_spans_prompt_and_output():
    seq = make_request(prompt=[0, 1, 2, 3]).seqs[0]
    seq.output_token_ids += [4, 5, 6]
    for start in range(8):
        for end in range(start, 8):
            assert seq.token_slice(start, end) == list(range(start, min(end, 7)))


def test_arrival_time_defaults_to_now():
    import time
    before = time.time()
    assert before <= make_request().arrival_time <= time.time()


def test_siblings_group():
    req = make_request(n=3, req_id="abc")
    assert [s.seq_id for s in req.seqs] == ["abc#0", "abc#1", "abc#2"]
    assert [s.index for s in req.seqs] == [0, 1, 2]
    assert req.pending_siblings == req.seqs[1:]  # they wait for seqs[0] to compute the prompt
    assert all(s.prompt_token_ids is req.prompt_token_ids for s in req.seqs)
    req.seqs[1].output_token_ids.append(7)
    assert req.seqs[0].output_token_ids == [] and req.seqs[2].output_token_ids == []
    assert not req.is_finished
    req.seqs[0].status = S.FINISHED_ABORTED
    assert req.unfinished_seqs() == req.seqs[1:]
    for seq in req.seqs[1:]:
        seq.status = S.FINISHED_ABORTED
    assert req.is_finished and req.unfinished_seqs() == []


def test_seq_ids_never_collide_across_requests():
    # everything after the last '#' is the sibling index, so no two (req_id, index) share an id
    ids = [s.seq_id for rid, n in [("a", 11), ("a#1", 1), ("a#", 2), ("#", 2)]
           for s in make_request(n=n, req_id=rid).seqs]
    assert len(ids) == len(set(ids))


def test_scheduler_package_never_imports_torch_or_ray():
    import subprocess
    import sys
    code = ("import sys, scheduler.scheduler, scheduler.block_manager, scheduler.policy; "
            "print(sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules))")
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.strip() == "[]", out.stderr
