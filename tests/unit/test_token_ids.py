import numpy as np
import pytest

from scheduler.errors import InvalidRequestError
from scheduler.request import pack_token_ids
from scheduler.token_ids import check_and_pack_token_ids, unpack_token_ids


def check_token_ids(token_ids, vocab_size, field="prompt_token_ids"):
    """The check as entry points show its result: plain ints from the packing."""
    return unpack_token_ids(check_and_pack_token_ids(token_ids, vocab_size, field)[1])


def test_ids_in_range_come_back_as_plain_ints():
    out = check_token_ids((np.int64(3), 0, 9), 10)
    assert out == [3, 0, 9] and all(type(t) is int for t in out)
    assert check_token_ids([], 10) == []
    assert check_token_ids(np.array([4, 5]), 10) == [4, 5]
    assert check_token_ids((t for t in (1, 2)), 10) == [1, 2]  # any iterable of integers


@pytest.mark.parametrize("bad", [[-1], [10], [1, 2, 10**9], [1.5], ["a"], [2**70], [None], b"\x01\x02", [[1, 2]], 7])
def test_bad_ids_name_the_field_and_the_range(bad):
    for check in (check_token_ids, check_and_pack_token_ids):
        with pytest.raises(InvalidRequestError, match=r"prompt_token_ids: .*\[0, 10\)"):
            check(bad, 10)


@pytest.mark.parametrize("ids", [[], [0], (np.int64(3), 0, 9), list(range(151935, 151935 - 2052, -1)), np.array([4, 5])])
def test_the_packing_is_the_prefix_caches_packing_of_the_same_list(ids):
    checked, packed = check_and_pack_token_ids(ids, 151936)
    assert checked == check_token_ids(ids, 151936) == list(ids)  # the caller's objects, by value
    assert packed == pack_token_ids(checked)
    plain = unpack_token_ids(packed)
    assert plain == checked and all(type(t) is int for t in plain)


def test_an_id_out_of_range_is_named():
    with pytest.raises(InvalidRequestError, match=r"token_ids: .*got 12$"):
        check_token_ids([3, 12, 4], 10, field="token_ids")
    with pytest.raises(InvalidRequestError, match=r"got -2$"):
        check_token_ids([3, -2, 40], 10)


@pytest.mark.parametrize("numpy_from", [0, 10**9])
def test_both_range_checks_refuse_the_same_ids(numpy_from, monkeypatch):
    """Short prompts take builtin max, long ones numpy's: the same ids pass and fail either way."""
    from scheduler import token_ids

    monkeypatch.setattr(token_ids, "NUMPY_MAX_FROM", numpy_from)
    assert check_and_pack_token_ids([0, 9, 3], 10)[0] == [0, 9, 3]

    class Index:  # an integer only through __index__: it packs but does not compare
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    assert check_token_ids([Index(4), 2], 10) == [4, 2]
    with pytest.raises(InvalidRequestError, match="got 12$"):
        check_and_pack_token_ids([Index(12), 2], 10)
    for bad, named in (([3, 10, 4], "got 10$"), ([3, 2**31, 4], "got 2147483648$"), ([5, -1], "got -1$")):
        with pytest.raises(InvalidRequestError, match=named):
            check_and_pack_token_ids(bad, 10)
