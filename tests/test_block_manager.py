"""Block manager: reference counts, prefix hits (verified), LRU eviction; n > 1 siblings share by prefix hits."""

from __future__ import annotations

import pytest
from gearshift.engine.block_manager import BlockManager
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.sequence import Sequence, fan_out

BS = 4


def seq_of(tokens: list[int], n: int = 1) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=8, n=n))


def compute(bm: BlockManager, seq: Sequence, num_new: int, cached=()) -> None:
    """What the scheduler and runner do for one step: allocate, 'run', register full blocks."""
    assert bm.allocate(seq, num_new, cached)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, BS)
    seq = seq_of(list(range(10)))
    compute(bm, seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.check([seq])
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0
    # The two full blocks stay cached (evictable), the partial one went back to the free list.
    assert bm.num_cached_free_blocks == 2
    bm.check([])


def test_failed_allocation_changes_nothing() -> None:
    bm = BlockManager(3, BS)
    seq = seq_of(list(range(16)))
    assert not bm.allocate(seq, 16)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert bm.prefix_cache_queries == 0  # a refused admission is not a lookup
    assert bm.allocate(seq, 12)
    assert bm.num_free_blocks == 0
    bm.check([seq])


def test_prefix_hit_shares_blocks_and_counts_tokens() -> None:
    bm = BlockManager(16, BS)
    a = seq_of(list(range(11)))  # blocks [0..3] [4..7] full, [8..10] partial
    compute(bm, a, 11)
    b = seq_of(list(range(8)) + [99, 98, 97, 96, 95])
    hits = bm.lookup(b)
    assert hits == a.block_table[:2]
    compute(bm, b, b.num_tokens - 8, hits)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 13
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (11 + 13, 8)
    bm.check([a, b])
    bm.free(a)
    bm.free(b)
    bm.check([])
    assert bm.num_free_blocks == 16


def test_hit_is_capped_so_the_last_token_is_recomputed() -> None:
    bm = BlockManager(8, BS)
    a = seq_of(list(range(8)))
    compute(bm, a, 8)
    bm.free(a)
    b = seq_of(list(range(8)))  # the same two full blocks: only the first may hit
    assert len(bm.lookup(b)) == 1
    c = seq_of(list(range(9)))  # one more token: both full blocks hit
    assert len(bm.lookup(c)) == 2


def test_hit_is_verified_against_token_ids() -> None:
    bm = BlockManager(8, BS)
    a = seq_of(list(range(9)))
    compute(bm, a, 9)
    # Pretend a hash collision: the registered block now claims other tokens under the same hash.
    bm.blocks[a.block_table[1]].token_ids = (40, 41, 42, 43)
    assert bm.lookup(seq_of(list(range(9)))) == a.block_table[:1]
    bm.blocks[a.block_table[0]].parent_hash = 12345
    assert bm.lookup(seq_of(list(range(9)))) == []


def test_different_prefix_same_block_tokens_do_not_hit() -> None:
    bm = BlockManager(8, BS)
    compute(bm, seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    # Second block's tokens equal, first block differs: the chain hash must not match.
    assert bm.lookup(seq_of([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_lru_evicts_least_recently_freed_and_tail_first() -> None:
    bm = BlockManager(6, BS)
    a = seq_of(list(range(100, 109)))  # 2 full blocks + 1 partial
    b = seq_of(list(range(200, 209)))
    compute(bm, a, 9)
    compute(bm, b, 9)
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_free_blocks == 4 and bm.num_free_blocks == 6
    # 2 fresh blocks come from the free list (the partial ones); the third evicts a's tail block.
    c = seq_of(list(range(300, 312)))
    compute(bm, c, 12)
    assert len(bm.lookup(seq_of(list(range(100, 109))))) == 1  # a's head block survived
    assert len(bm.lookup(seq_of(list(range(200, 209))))) == 2  # b untouched
    bm.check([c])


def test_touching_a_cached_block_protects_it_from_eviction() -> None:
    bm = BlockManager(4, BS)
    a = seq_of(list(range(9)))
    compute(bm, a, 9)
    bm.free(a)
    b = seq_of(list(range(9)))
    hits = bm.lookup(b)
    assert len(hits) == 2
    # 2 cached blocks + 2 free; b needs its 2 hits plus 1 fresh: the hits are not counted as free.
    assert bm.can_allocate(b, 1, hits)
    compute(bm, b, 1, hits)
    assert bm.num_free_blocks == 1
    other = seq_of([7] * 8)
    assert not bm.allocate(other, 8)
    bm.check([b])


def test_fanned_out_siblings_share_full_prompt_blocks_and_own_the_partial_one() -> None:
    bm = BlockManager(8, BS)
    first, sibling = fan_out("r", list(range(6)), SamplingParams(max_tokens=4, n=2))  # one full block, one partial
    assert not sibling.admissible or first.status.value == "waiting"
    compute(bm, first, 6)
    hits = bm.lookup(sibling)
    assert hits == first.block_table[:1]  # the full block only: a partial block is never shared
    compute(bm, sibling, 6 - BS, hits)
    assert sibling.block_table[0] == first.block_table[0] and sibling.block_table[1] != first.block_table[1]
    assert [bm.blocks[b].ref_count for b in sibling.block_table] == [2, 1]
    bm.check([first, sibling])
    bm.free(first)
    bm.free(sibling)
    assert bm.num_free_blocks == 8
    bm.check([])


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq_of(list(range(9)))
    compute(bm, a, 9)
    bm.free(a)
    assert bm.lookup(seq_of(list(range(9)))) == [] and bm.num_cached_free_blocks == 0


def test_rejects_empty_cache() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BS)
