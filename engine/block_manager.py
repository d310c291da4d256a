"""KV-cache block accounting: fixed-size blocks, reference counts, automatic prefix caching.

A full block is named by a chained hash: hash(parent block's hash, its token ids), so equal hashes mean
equal prefixes. On a hit the stored parent hash and token ids are compared too (a 64-bit collision must
not hand one prompt another's KV). Blocks nobody references but whose contents are registered stay
cached in an LRU and are evicted only when a fresh block is needed and the free list is empty.

Only full, computed blocks are ever shared (prefix hits), and nobody writes into a full block, so there is
no copy-on-write: n > 1 choices are separate sequences from the start (sequence.fan_out).
Pure Python: block ids only. The model runner owns the tensor the ids index.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from gearshift.engine.sequence import Sequence

_ROOT_HASH = 0x5EED  # the parent hash of block 0


def chain_hash(parent_hash: int, token_ids: Seq[int]) -> int:
    """Deterministic across processes: Python's hash of a tuple of ints is not randomized."""
    return hash((parent_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full, computed and registered in the cache
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()

    def reset(self) -> None:
        self.hash = None
        self.parent_hash = None
        self.token_ids = ()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached; least recent first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up at admission, cumulative
        self.prefix_cache_hits = 0  # of which served from the cache

    # -- counts ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: never-used/invalidated ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- prefix cache --------------------------------------------------------------------------------
    def _extend_hashes(self, seq: Sequence) -> None:
        """Hashes for every full block of the sequence's known tokens (they never change)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else _ROOT_HASH
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`, verified token by token; nothing reserved.

        At most num_tokens - 1 tokens can hit: the last token must run to produce logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(seq)
        bs = self.block_size
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self._cached.get(seq.block_hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = seq.block_hashes[i - 1] if i else _ROOT_HASH
            if block.parent_hash != parent or block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: treat as a miss
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full and computed, so later prompts can hit them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return  # the common decode step: no block filled up
        self._extend_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = seq.block_hashes[i]
            if h in self._cached:
                continue  # the same prefix was computed twice in one step; keep the first, this one stays private
            block.hash = h
            block.parent_hash = seq.block_hashes[i - 1] if i else _ROOT_HASH
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self._cached[h] = block.block_id
        seq.num_registered_blocks = num_full

    # -- allocation --------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Seq[int] = ()) -> bool:
        return self._blocks_needed(seq, num_new_tokens, cached_blocks) <= self.num_free_blocks - sum(
            1 for b in cached_blocks if self.blocks[b].ref_count == 0
        )

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, cached_blocks: Seq[int]) -> int:
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        have = len(seq.block_table) + len(cached_blocks)
        return max(0, self.blocks_for(num_computed + num_new_tokens) - have)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Seq[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing changed) if they don't fit.

        `cached_blocks` (from `lookup`, only when the sequence holds no blocks) are taken first and advance
        num_computed_tokens past the cached prefix.
        """
        if not cached_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size:
            return True  # the common decode step: the last block still has room
        if cached_blocks and seq.block_table:
            raise ValueError("cached blocks can only start an empty block table")
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if not seq.block_table and seq.num_preemptions == 0:
            # First admission only: a preempted sequence finding its own blocks again is not a user-visible hit.
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(cached_blocks) * self.block_size
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens += len(cached_blocks) * self.block_size
        for _ in range(self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)):
            seq.block_table.append(self._pop_fresh())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks enter the LRU first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    # -- internals -----------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        """Reference a cached block (a prefix hit); it leaves the LRU if nobody held it."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _pop_fresh(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently freed cached block
            block = self.blocks[block_id]
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.reset()
        block = self.blocks[block_id]
        assert block.ref_count == 0 and block.hash is None
        block.ref_count = 1
        return block_id

    def check(self, live: Seq[Sequence]) -> None:
        """Raise if the counts disagree with the live sequences' tables (tests call it after every step)."""
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count}, held {refs[block.block_id]}")
        idle = set(self._free) | set(self._evictable)
        if len(idle) != len(self._free) + len(self._evictable):
            raise AssertionError("a block is both free and evictable, or listed twice")
        for block in self.blocks:
            if (block.ref_count == 0) != (block.block_id in idle):
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count} but idle={block.block_id in idle}")
        for block_id in self._evictable:
            if self.blocks[block_id].hash is None:
                raise AssertionError(f"evictable block {block_id} holds no cached prefix")
