"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, a free pool, a prefix cache.

The prefix cache is a trie of full blocks whose KV has been computed. A block is found by its
exact key, its parent's node followed by the block's token ids packed as int32 bytes, where a
node names one whole prefix: the root is node 0, and caching a block under a key no block holds
yet gives it a fresh node. Keys are bytes, not tuples: the garbage collector does not track
bytes, so a cache of many blocks adds nothing to its collections.
Node ids are never reused, so a node names the same tokens for good: a hit means equal whole
prefixes, compared token by token (dict lookups), with no hash that could collide. Once a block
is evicted, its key's node is gone and the blocks cached under it are unreachable, as a
chained hash's would be; they wait in the LRU pool for their own eviction.

When its last reference goes, a cached block stays findable in an LRU pool until it is reused;
reuse takes never-cached blocks first, then the least recently freed cached one. Every call costs
O(blocks touched): it is on the step path.

A finished sequence's blocks are released (release) and reach the pool later (return_released):
the engine returns them while the device runs its next step, so a request's last token does not
wait for the ~130 reference counts of a 2k-token prompt. Until then they keep their references,
so a prefix hit on them takes them as it takes any held block, and the first allocation the pool
cannot serve without them returns them at once.
"""
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from scheduler.request import Sequence, pack_token_ids

NODE_BYTES = 8  # a node id as little-endian bytes, a key's first bytes
ROOT = bytes(NODE_BYTES)  # the node of the empty prefix: the parent of every sequence's first block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # parent node + packed block tokens -> block id, and back; a findable block's own node
        self.cached_blocks: dict[bytes, int] = {}
        self.block_key: list[bytes | None] = [None] * num_blocks  # set while findable
        self.block_node: list[bytes] = [ROOT] * num_blocks  # meaningful while block_key is set
        self._next_node = 1
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._released: list[list[int]] = []  # block tables released and not yet returned, oldest first
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    # ---- state ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (released ones are returned to the pool first)."""
        self.return_released()
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------
    def _block_bytes(self, seq: Sequence, start: int, end: int) -> bytes:
        """Packed tokens of seq's blocks [start, end). A prompt is packed once a request (its
        siblings and a requeue reuse it); tokens past it, a few blocks at most, on demand."""
        bs, num_prompt = self.block_size, seq.num_prompt_tokens
        if end * bs <= num_prompt:
            return seq.request.packed_prompt()[4 * start * bs:4 * end * bs]
        return pack_token_ids(seq.token_slice(start * bs, end * bs))

    def _walk(self, data: bytes) -> list[int]:
        """The cached blocks that hold data's leading full blocks, from the root to the first miss."""
        width, node, blocks = 4 * self.block_size, ROOT, []
        get, block_node, append = self.cached_blocks.get, self.block_node, blocks.append
        # one dict lookup a block: ~0.25 us against ~0.7 for a chained blake2b (CI machine)
        for start in range(0, len(data) - width + 1, width):
            block_id = get(node + data[start:start + width])
            if block_id is None:
                break
            append(block_id)
            node = block_node[block_id]
        return blocks

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks; no state changes.

        Stops one token short of the whole sequence: the last token is always computed so that
        there are logits to sample from (a requeued sequence included, whatever it cached while a
        sampled token was pending that a dead worker then lost).
        """
        if not self.enable_prefix_caching:
            return []
        return self._walk(self._block_bytes(seq, 0, (seq.num_tokens - 1) // self.block_size))

    def num_cached_tokens(self, token_ids: list[int]) -> int:
        """Tokens of this prompt the cache would serve now; touches neither LRU order nor stats."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        num_blocks = (len(token_ids) - 1) // bs
        # the first block alone first: placing a request asks every replica, and for most prompts
        # the answer is a miss there, where packing the whole prompt would cost ~25 us a replica
        if num_blocks == 0 or ROOT + pack_token_ids(token_ids[:bs]) not in self.cached_blocks:
            return 0
        return len(self._walk(pack_token_ids(token_ids[:num_blocks * bs]))) * bs

    def cache_blocks(self, seq: Sequence) -> None:
        """Make seq's full computed blocks findable. Call once their KV is written (after the step)."""
        if not self.enable_prefix_caching:
            return
        # blocks whose tokens are all known: KV computed past num_tokens is for pending samples.
        # Called for every sequence whose step filled a block (half of them a step at k = 8)
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        nodes = seq.block_nodes  # one a block already keyed: those blocks are done
        start = len(nodes)
        if num_full <= start:
            return
        data, width = self._block_bytes(seq, start, num_full), 4 * self.block_size
        cached_blocks, block_key, block_node = self.cached_blocks, self.block_key, self.block_node
        node = nodes[-1] if nodes else ROOT
        for i, block_id in enumerate(seq.block_ids[start:num_full]):
            key = node + data[i * width:(i + 1) * width]
            found = cached_blocks.get(key)
            if found is not None:
                # an equal block computed twice (two requests prefilling the same prefix at
                # once) stays uncached: the first copy is the one others find; its node names
                # this block's prefix too
                node = block_node[found]
            elif block_key[block_id] is None:
                node = self._next_node.to_bytes(NODE_BYTES, "little")
                self._next_node += 1
                cached_blocks[key] = block_id
                block_key[block_id], block_node[block_id] = key, node
            else:  # keyed under another prefix, which sharing by hit or fork never does: the
                break  # rest stays uncached rather than chained from a node that isn't its prefix
            nodes.append(node)

    # ---- allocation -----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, computed_blocks: Seq[int] = ()) -> bool:
        """Could seq hold num_tokens tokens in total, after taking computed_blocks from the cache?"""
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_ids) - len(computed_blocks)
        # a cached block nobody references sits in the free pool: taking it uses up a free block
        while True:
            num_revived = (list(map(self.ref_counts.__getitem__, computed_blocks)).count(0)
                           if computed_blocks else 0)
            if max(num_new, 0) + num_revived <= len(self.free_uncached) + len(self.free_cached):
                return True
            if not self._released:
                return False
            self.return_released()  # then count again: a returned block may be one of computed_blocks

    def allocate(self, seq: Sequence, num_tokens: int, computed_blocks: list[int] | None = None) -> list[int]:
        """Grow seq's block table to hold num_tokens; return the block ids appended.

        computed_blocks is passed on admission only (from get_computed_blocks, maybe empty):
        those blocks are taken first and the lookup counts in the hit statistics.
        """
        new_block_ids = []
        if computed_blocks is not None:
            assert not seq.block_ids, f"{seq.seq_id} is admitted twice"
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += len(computed_blocks) * self.block_size
            self._take(computed_blocks)
            new_block_ids.extend(computed_blocks)
            # nodes only from this cache: a sequence resumed from another replica holds none
            seq.block_nodes = list(map(self.block_node.__getitem__, computed_blocks))
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_ids) - len(new_block_ids)
        for _ in range(num_new):
            block_id = self._pop_free()
            self.ref_counts[block_id] = 1
            new_block_ids.append(block_id)
        seq.block_ids.extend(new_block_ids)
        return new_block_ids

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Share parent's first num_blocks (full, computed) blocks with child by reference count."""
        assert not child.block_ids, f"{child.seq_id} already holds blocks"
        assert num_blocks * self.block_size <= parent.num_computed_tokens, "only computed full blocks are shared"
        child.block_ids = parent.block_ids[:num_blocks]
        self._take(child.block_ids)
        # the parent keyed these when their step ended (before its siblings fork): the child's
        # later blocks chain from the same nodes
        child.block_nodes = parent.block_nodes[:num_blocks]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references now."""
        self.release(seq)
        self.return_released()

    def release(self, seq: Sequence) -> None:
        """Take seq's blocks from it; their references go at the next return_released()."""
        if seq.block_ids:
            self._released.append(seq.block_ids)
        seq.block_ids = []
        seq.block_nodes = []

    def return_released(self) -> None:
        """Drop the references of every table released so far, in release order."""
        if not self._released:
            return
        released, self._released = self._released, []
        ref_counts, block_key = self.ref_counts, self.block_key  # bound: ~130 blocks a 2k-token prompt
        free_uncached, free_cached = self.free_uncached, self.free_cached
        for block_ids in released:
            # Tail first, so a prefix's head is the most recently freed and the last evicted:
            # evicting the head would make the rest of the chain unreachable anyway.
            for block_id in reversed(block_ids):
                ref_counts[block_id] -= 1
                if ref_counts[block_id] == 0:
                    if block_key[block_id] is None:
                        free_uncached.append(block_id)
                    else:
                        free_cached[block_id] = None

    def _take(self, block_ids: list[int]) -> None:
        """One more reference to each block; a block nobody referenced leaves the free pool."""
        ref_counts, free_cached = self.ref_counts, self.free_cached
        for block_id in block_ids:
            if ref_counts[block_id] == 0:
                del free_cached[block_id]
            ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        if not self.free_uncached and not self.free_cached:
            self.return_released()
        if self.free_uncached:
            return self.free_uncached.popleft()
        block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently freed
        del self.cached_blocks[self.block_key[block_id]]
        self.block_key[block_id] = None
        return block_id

    # ---- checks ---------------------------------------------------------------------------
    def check_no_leaks(self) -> None:
        """Raise AssertionError naming every block still referenced; tests end with this."""
        self.return_released()
        leaked = {b: r for b, r in enumerate(self.ref_counts) if r != 0}
        assert not leaked, f"{len(leaked)} KV blocks still referenced (block id: ref count): {leaked}"
        pool = set(self.free_uncached) | set(self.free_cached)
        assert len(pool) == self.num_free_blocks == self.num_blocks, (
            f"free pool holds {len(pool)} distinct of {self.num_free_blocks} entries, "
            f"expected all {self.num_blocks} blocks")
        for key, block_id in self.cached_blocks.items():
            assert self.block_key[block_id] == key, f"block {block_id} key map out of sync"
        assert sum(key is not None for key in self.block_key) == len(self.cached_blocks), "stale block keys"
