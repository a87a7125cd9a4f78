import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_manager import ROOT, BlockManager
from scheduler.request import Request, Sequence
from scheduler.sampling_params import SamplingParams

BS = 4


def make_seq(tokens, req_id="r") -> Sequence:
    return Request(req_id, list(tokens), SamplingParams()).seqs[0]


def admit(bm: BlockManager, seq: Sequence, computed: bool = True) -> list[int]:
    """Admit like the scheduler does, then pretend the whole sequence was computed and cached."""
    hits = bm.get_computed_blocks(seq)
    assert bm.can_allocate(seq, seq.num_tokens, hits)
    bm.allocate(seq, seq.num_tokens, hits)
    if computed:
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_blocks(seq)
    return hits


def test_allocate_free_ref_counts_and_usage():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq, 10) and bm.usage == 0.0
    assert bm.allocate(seq, 10, []) == [0, 1, 2]
    assert seq.block_ids == [0, 1, 2] and bm.ref_counts[:4] == [1, 1, 1, 0]
    assert bm.usage == 3 / 8 and bm.num_free_blocks == 5
    assert bm.allocate(seq, 12) == []  # still fits in block 2
    assert bm.allocate(seq, 13) == [3]
    bm.free(seq)
    assert seq.block_ids == [] and bm.usage == 0.0
    bm.check_no_leaks()


def test_can_allocate_respects_capacity():
    bm = BlockManager(3, BS)
    a, b = make_seq(range(8), "a"), make_seq(range(100, 108), "b")
    assert bm.can_allocate(a, 12) and not bm.can_allocate(a, 13)
    bm.allocate(a, 8, [])
    assert bm.can_allocate(b, 4) and not bm.can_allocate(b, 5)
    bm.free(a)
    bm.check_no_leaks()


def test_fork_shares_blocks_by_ref_count():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    parent, child = make_seq(range(10), "p"), make_seq(range(10), "c")
    admit(bm, parent)
    bm.fork(parent, child, 2)
    assert child.block_ids == parent.block_ids[:2]
    assert [bm.ref_counts[b] for b in parent.block_ids] == [2, 2, 1]
    with pytest.raises(AssertionError, match="computed full blocks"):
        bm.fork(parent, make_seq(range(10), "d"), 3)
    bm.free(parent)
    assert [bm.ref_counts[b] for b in child.block_ids] == [1, 1] and bm.num_free_blocks == 6
    bm.free(child)
    bm.check_no_leaks()


def test_prefix_hit_only_full_computed_blocks():
    bm = BlockManager(16, BS)
    a = make_seq(range(10), "a")
    admit(bm, a, computed=False)
    a.num_computed_tokens = 7  # one full block computed so far
    bm.cache_blocks(a)
    assert len(bm.cached_blocks) == 1
    a.num_computed_tokens = 10
    bm.cache_blocks(a)
    assert len(bm.cached_blocks) == 2  # the partial third block is never cached
    b = make_seq(list(range(8)) + [99, 98, 97], "b")
    assert admit(bm, b) == a.block_ids[:2]
    assert b.block_ids[:2] == a.block_ids[:2] and bm.ref_counts[a.block_ids[0]] == 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 11, 8)
    bm.free(a), bm.free(b)
    bm.check_no_leaks()


def test_hit_never_covers_the_last_token():
    bm = BlockManager(16, BS)
    a = make_seq(range(8), "a")
    admit(bm, a)
    assert len(bm.cached_blocks) == 2
    same = make_seq(range(8), "b")
    assert len(bm.get_computed_blocks(same)) == 1  # 8 tokens: block 1 holds the last, recompute it
    assert bm.num_cached_tokens(list(range(8))) == 4 and bm.num_cached_tokens(list(range(9))) == 8
    bm.free(a)
    bm.check_no_leaks()


def test_a_requeued_sequence_recomputes_its_last_token_whatever_it_cached():
    """A sequence can have cached its last known token's block (keyed while a sampled token was
    pending); if a dead worker loses that token, the requeued sequence must still compute its last
    token, or it would have no logits to sample from."""
    bm = BlockManager(16, BS)
    seq = make_seq(range(8))
    admit(bm, seq)
    assert len(seq.block_nodes) == 2 and len(bm.cached_blocks) == 2, "both full blocks keyed, the last token's included"
    bm.free(seq)
    assert seq.block_nodes == [], "nodes go with the blocks: a requeue takes them from its hits"
    seq.num_computed_tokens = 0
    assert len(bm.get_computed_blocks(seq)) == 1, "block 1 holds the last token: recompute it"
    bm.check_no_leaks()


def test_hashes_are_chained():
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    # same second block after a different first block: not a hit
    assert bm.get_computed_blocks(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == []
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7, 0, 9], "c")) == a.block_ids[:1]
    bm.free(a)
    bm.check_no_leaks()


def test_keys_are_exact_tokens_under_their_parent_node():
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    first, second = (bm.block_key[b] for b in a.block_ids[:2])
    assert first == ROOT + struct.pack("4i", 1, 2, 3, 4)
    assert second == bm.block_node[a.block_ids[0]] + struct.pack("4i", 5, 6, 7, 8)
    assert all(type(k) is bytes for k in bm.cached_blocks), "bytes: keys the garbage collector ignores"
    # one id different in the first block: no hit
    b = make_seq([1 << 16, 2, 3, 4, 9], "b")
    assert bm.get_computed_blocks(b) == []
    bm.free(a)
    bm.check_no_leaks()


def test_an_evicted_block_id_keyed_again_gets_a_fresh_node():
    """Nodes are never reused: a child keyed under an evicted block's node must not match under
    the node of whatever tokens that block id holds next (as keying by block id would)."""
    bm = BlockManager(4, BS)
    a = make_seq(range(9), "a")  # blocks [0..3] and [4..7] keyed, the tail uncached
    admit(bm, a)
    old_nodes = {bm.block_node[b] for b in a.block_ids[:2]}
    bm.free(a)
    b = make_seq(list(range(100, 116)), "b")  # every block: both of a's evicted
    admit(bm, b, computed=False)
    assert bm.cached_blocks == {}
    b.num_computed_tokens = 16
    bm.cache_blocks(b)
    new_nodes = {bm.block_node[x] for x in b.block_ids}
    assert len(new_nodes) == 4 and not new_nodes & old_nodes and ROOT not in new_nodes
    bm.free(b)
    assert bm.get_computed_blocks(make_seq(range(9), "c")) == []
    bm.check_no_leaks()


def test_nodes_chain_across_a_partial_prompt_and_outputs():
    """Blocks keyed over several steps, outputs included, are found by a prompt of the same tokens."""
    bm = BlockManager(16, BS)
    a = make_seq(range(6), "a")
    admit(bm, a)  # block 0 keyed, block 1 half full
    a.output_token_ids.extend([50, 51, 52, 53])
    bm.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.cache_blocks(a)
    assert len(a.block_nodes) == 2
    b = make_seq(list(range(6)) + [50, 51, 52, 53, 77], "b")
    assert bm.get_computed_blocks(b) == a.block_ids[:2]
    assert bm.num_cached_tokens(b.prompt_token_ids) == 8
    bm.free(a)
    bm.check_no_leaks()


def test_lru_eviction_takes_uncached_then_least_recently_freed():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(100, 109), "a"), make_seq(range(200, 209), "b")
    admit(bm, a), admit(bm, b)  # 3 blocks each, 2 full ones cached
    bm.free(a), bm.free(b)
    assert bm.num_cached_tokens(a.prompt_token_ids) == 8 and bm.num_cached_tokens(b.prompt_token_ids) == 8
    c = make_seq(range(300, 321), "c")  # 6 blocks: 4 never cached, then a's 2 (freed first)
    admit(bm, c, computed=False)
    assert bm.num_cached_tokens(a.prompt_token_ids) == 0 and bm.num_cached_tokens(b.prompt_token_ids) == 8
    bm.free(c)
    bm.check_no_leaks()


def test_hit_refreshes_lru_position():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(100, 109), "a"), make_seq(range(200, 209), "b")
    admit(bm, a), admit(bm, b)
    bm.free(a), bm.free(b)
    a2 = make_seq(range(100, 109), "a2")
    assert len(admit(bm, a2)) == 2  # revives a's cached blocks, so now b's are the oldest
    bm.free(a2)
    c = make_seq(range(300, 321), "c")
    admit(bm, c, computed=False)
    assert bm.num_cached_tokens(a.prompt_token_ids) == 8 and bm.num_cached_tokens(b.prompt_token_ids) == 0
    bm.free(c)
    bm.check_no_leaks()


def test_revived_cached_blocks_count_against_free_pool():
    bm = BlockManager(3, BS)
    a = make_seq(range(9), "a")
    admit(bm, a)
    bm.free(a)
    b = make_seq(range(9), "b")
    hits = bm.get_computed_blocks(b)
    assert len(hits) == 2
    assert bm.can_allocate(b, 9, hits) and not bm.can_allocate(b, 13, hits)
    bm.allocate(b, 9, hits)
    assert bm.num_free_blocks == 0
    bm.free(b)
    bm.check_no_leaks()


def test_num_cached_tokens_leaves_lru_and_stats_alone():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(100, 109), "a"), make_seq(range(200, 209), "b")
    admit(bm, a), admit(bm, b)
    bm.free(a), bm.free(b)
    order, stats = list(bm.free_cached), (bm.prefix_cache_queries, bm.prefix_cache_hits)
    assert bm.num_cached_tokens(a.prompt_token_ids) == 8
    assert list(bm.free_cached) == order and (bm.prefix_cache_queries, bm.prefix_cache_hits) == stats


def test_duplicate_block_stays_uncached():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(9), "a"), make_seq(range(9), "b")
    admit(bm, a, computed=False), admit(bm, b, computed=False)  # both prefill the same prompt at once
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.cache_blocks(seq)
    assert len(bm.cached_blocks) == 2 and set(bm.cached_blocks.values()) == set(a.block_ids[:2])
    bm.free(b)
    assert len(bm.free_uncached) == 2 + 3  # b's copies are plain free blocks
    bm.free(a)
    bm.check_no_leaks()


def test_prefix_caching_off():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(9), "a")
    admit(bm, a)
    bm.free(a)
    assert bm.cached_blocks == {} and bm.get_computed_blocks(make_seq(range(9), "b")) == []
    assert bm.num_cached_tokens(list(range(9))) == 0 and bm.prefix_cache_queries == 0
    bm.check_no_leaks()


def test_check_no_leaks_names_blocks():
    bm = BlockManager(4, BS)
    seq = make_seq(range(6))
    bm.allocate(seq, 6, [])
    with pytest.raises(AssertionError, match=r"2 KV blocks still referenced .*\{0: 1, 1: 1\}"):
        bm.check_no_leaks()
    bm.free(seq)
    bm.check_no_leaks()


def test_released_blocks_keep_their_references_until_returned():
    bm = BlockManager(8, BS)
    a = make_seq(range(100, 109), "a")
    admit(bm, a)
    held = list(a.block_ids)
    bm.release(a)
    assert a.block_ids == [] and a.block_nodes == []
    assert [bm.ref_counts[b] for b in held] == [1, 1, 1]  # not back in the pool yet
    assert len(bm.free_uncached) + len(bm.free_cached) == 5
    b = make_seq(range(100, 110), "b")
    assert admit(bm, b) == held[:2]  # a hit takes them as any held block
    assert [bm.ref_counts[x] for x in held] == [2, 2, 1]
    bm.return_released()
    assert [bm.ref_counts[x] for x in held] == [1, 1, 0] and held[2] in bm.free_uncached
    bm.release(b)
    bm.check_no_leaks()  # returns what is still released first


def test_release_then_return_frees_in_the_order_free_would():
    now, later = BlockManager(8, BS), BlockManager(8, BS)
    for bm in (now, later):
        seqs = [make_seq(range(100 * k, 100 * k + 9), f"s{k}") for k in (1, 2)]
        for seq in seqs:
            admit(bm, seq)
        for seq in seqs:
            bm.free(seq) if bm is now else bm.release(seq)
    later.return_released()
    assert list(later.free_cached) == list(now.free_cached)
    assert list(later.free_uncached) == list(now.free_uncached)


def test_an_allocation_short_of_blocks_returns_the_released_ones():
    bm = BlockManager(3, BS)
    a, b = make_seq(range(12), "a"), make_seq(range(100, 112), "b")
    admit(bm, a)
    bm.release(a)
    assert bm.can_allocate(b, 12)  # needs all 3: the released ones come back first
    assert bm.allocate(b, 12, []) and sorted(b.block_ids) == [0, 1, 2]
    bm.release(b)
    c = make_seq(range(200, 204), "c")
    assert len(bm.allocate(c, 4, [])) == 1  # without can_allocate: the empty pool returns them too
    assert sum(bm.ref_counts) == 1 and len(bm.free_uncached) + len(bm.free_cached) == 2
    bm.free(c)
    bm.check_no_leaks()


def test_num_free_blocks_counts_released_blocks_once_returned():
    bm = BlockManager(8, BS)
    a = make_seq(range(9), "a")
    admit(bm, a)
    bm.release(a)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_no_leaks()


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "fork", "free", "release", "return"]), st.integers(0, 30),
                          st.integers(0, 2)), max_size=40),
       st.booleans())
def test_random_operations_keep_invariants(ops, caching):
    bm = BlockManager(12, BS, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for i, (op, x, prefix) in enumerate(ops):
        if op == "add":
            seq = make_seq([prefix] * 4 + list(range(x + 1)), f"s{i}")
            hits = bm.get_computed_blocks(seq)
            if bm.can_allocate(seq, seq.num_tokens, hits):
                bm.allocate(seq, seq.num_tokens, hits)
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_blocks(seq)
                live.append(seq)
        elif live and op == "grow":
            seq = live[x % len(live)]
            seq.output_token_ids.extend(range(x % 6))
            if bm.can_allocate(seq, seq.num_tokens):
                bm.allocate(seq, seq.num_tokens)
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_blocks(seq)
        elif live and op == "fork":
            parent = live[x % len(live)]
            child = make_seq(parent.prompt_token_ids, f"s{i}")
            num_shared = min(parent.num_prompt_tokens - 1, parent.num_computed_tokens) // BS
            bm.fork(parent, child, num_shared)
            child.num_computed_tokens = num_shared * BS
            live.append(child)
        elif live and op == "free":
            bm.free(live.pop(x % len(live)))
        elif live and op == "release":
            bm.release(live.pop(x % len(live)))
        elif op == "return":
            bm.return_released()
        held = [b for seq in live for b in seq.block_ids] + [b for table in bm._released for b in table]
        assert sum(bm.ref_counts) == len(held)
        assert len(bm.free_uncached) + len(bm.free_cached) + len(set(held)) == bm.num_blocks
        for seq in live:  # a hit never points at a block that was reused for other tokens
            hits = bm.get_computed_blocks(make_seq(seq.prompt_token_ids, "probe"))
            assert all(bm.block_key[b] is not None for b in hits)
    for seq in live:
        bm.free(seq)
    bm.check_no_leaks()
