"""Paged KV cache: fixed-size blocks from one preallocated arena, a block table per sequence.

The arena holds keys and values for `num_blocks` blocks of `block_size`
positions, laid out (n_layers, n_kv_heads, num_blocks, block_size, head_dim) so
that a run of consecutive blocks is one contiguous (t, head_dim) range per kv
head: attention over a sequence whose blocks are consecutive reads a view, and
only a fragmented sequence pays a gather copy. The allocator therefore hands a
growing sequence the block right after its last one when it is free.

Running out of blocks is a return value (`reserve() -> False`), not an
exception: the scheduler preempts a sequence and retries.

Prefix caching (vLLM's automatic prefix caching): a block whose positions are all
computed can be registered under a hash of its tokens and of every token before it
(`block_hashes`). A later sequence starting with the same tokens takes those blocks
(`lookup`) instead of computing them again. Blocks are reference-counted and shared
read-only (a sequence only ever writes past its cached prefix); a registered block
no sequence holds stays cached, and is evicted least-recently-used only when the
arena has no plain free block left. `free_blocks` counts both, as both can be taken.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from typing import Sequence

import numpy as np

from engine.errors import ContextOverflow


class BlockArena:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: np.dtype = np.float32):
        shape = (n_layers, n_kv_heads, num_blocks, block_size, head_dim)
        # zero pages mapped lazily: an arena is sized for the plan's whole KV budget, and only
        # the blocks sequences use take memory (writing it through at creation cost a 16-stream
        # bench ~0.3 s less in page faults but committed every plan's budget at once: the test
        # suite's engines ran the host out of memory)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = 2 * n_layers * n_kv_heads * block_size * head_dim * np.dtype(dtype).itemsize
        self._free_heap = list(range(num_blocks))  # lowest block first
        self._free = set(self._free_heap)
        self._refs: dict[int, int] = {}  # block -> sequences holding it (every block not free)
        self._hash_of: dict[int, bytes] = {}  # registered blocks: block -> its prefix hash
        self._by_hash: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, held by none: LRU first
        self.evictions = 0

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int, dtype: np.dtype = np.float32) -> BlockArena:
        """An arena shaped for a model's config (n_layers, n_kv_heads, head_dim)."""
        return cls(config.n_layers, config.n_kv_heads, config.head_dim, num_blocks, block_size, dtype)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._by_hash)

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """n blocks, preferring the run right after block `after`; None if fewer than n are free.
        Cached blocks no sequence holds are evicted (least recently used first) only when no
        plain free block is left."""
        if n > self.free_blocks:
            return None
        out = []
        nxt = None if after is None else after + 1
        while len(out) < n and nxt is not None and nxt in self._free:
            self._free.discard(nxt)
            out.append(nxt)
            nxt += 1
        while len(out) < n and self._free:
            block = heapq.heappop(self._free_heap)
            if block in self._free:  # entries taken by the run above are stale in the heap
                self._free.discard(block)
                out.append(block)
        while len(out) < n:
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self.evictions += 1
            out.append(block)
        for b in out:
            self._refs[b] = 1
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block: the last one frees it, or keeps it cached if registered."""
        for b in blocks:
            refs = self._refs.get(b, 0)
            if refs == 0:
                raise RuntimeError(f"block {b} freed twice")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._idle[b] = None  # most recently used last
            else:
                self._free.add(b)
                heapq.heappush(self._free_heap, b)
        if len(self._free_heap) > 4 * self.num_blocks:  # drop stale heap entries now and then
            self._free_heap = sorted(self._free)

    def register(self, block: int, block_hash: bytes) -> None:
        """Offer a fully computed block for reuse under `block_hash` (no-op if that prefix is
        cached already, e.g. computed by two sequences at once)."""
        if block_hash in self._by_hash or block in self._hash_of or self._refs.get(block, 0) == 0:
            return
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes`, each with a reference taken."""
        out = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if block in self._idle:
                del self._idle[block]
            self._refs[block] = self._refs.get(block, 0) + 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Take one more reference to blocks already held (a forked sequence reads them too)."""
        for b in blocks:
            if self._refs.get(b, 0) == 0:
                raise RuntimeError(f"block {b} is not held: nothing to share")
            self._refs[b] += 1

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s keys and values, every layer, into block `dst` (copy on write)."""
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]

    def refs(self, block: int) -> int:
        return self._refs.get(block, 0)

    def stats(self) -> dict[str, int]:
        return {"blocks_total": self.num_blocks, "blocks_used": self.used_blocks, "blocks_free": self.free_blocks,
                "blocks_cached": self.cached_blocks, "block_size": self.block_size,
                "bytes_total": self.num_blocks * self.block_bytes, "bytes_used": self.used_blocks * self.block_bytes,
                "evictions": self.evictions}


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"", start: Sequence[bytes] = ()) -> list[bytes]:
    """Hash of every full block of `tokens`: sha256 of the previous block's hash (or `salt`: the
    model and weights the cache belongs to) and this block's token ids. Extends `start`, the hashes
    of the first len(start) blocks, computed earlier."""
    out = list(start)
    prev = out[-1] if out else salt
    for i in range(len(out) * block_size, len(tokens) - block_size + 1, block_size):
        prev = hashlib.sha256(prev + b"".join(int(t).to_bytes(4, "little") for t in tokens[i:i + block_size])).digest()
        out.append(prev)
    return out


HOLE = -1  # a block table entry whose block went back to the arena (forget_before)


class PagedKV:
    """One sequence's cache: a block table into the arena. Same interface as `SequenceKV`.

    A model whose layers all slide never reads a position again once it is out of every
    window: `forget_before` gives those blocks back and leaves holes in the table, so a
    position keeps its block index."""

    def __init__(self, arena: BlockArena, max_positions: int):
        self.arena = arena
        self.blocks: list[int] = []
        self.length = 0
        self.max_positions = max_positions
        self._run = 0  # the first _run blocks are consecutive in the arena

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.arena.block_size

    @property
    def held(self) -> list[int]:
        """The blocks this sequence holds (the table less its holes)."""
        return [b for b in self.blocks if b != HOLE]

    @property
    def nbytes(self) -> int:
        return len(self.held) * self.arena.block_bytes

    def blocks_needed(self, positions: int) -> int:
        return max(0, -(-positions // self.arena.block_size) - len(self.blocks))

    def reserve(self, positions: int) -> bool:
        """Make room for positions 0..positions-1; False (and nothing taken) if the arena is short."""
        if positions > self.max_positions:
            raise ContextOverflow(f"sequence needs {positions} positions, its limit is {self.max_positions}")
        need = self.blocks_needed(positions)
        if need == 0:
            return True
        got = self.arena.allocate(need, after=self.blocks[-1] if self.blocks else None)
        if got is None:
            return False
        for b in got:
            if self._run == len(self.blocks) and (not self.blocks or b == self.blocks[-1] + 1):
                self._run += 1
            self.blocks.append(b)
        return True

    def adopt(self, blocks: list[int]) -> None:
        """Start this (empty) sequence with `blocks`, cached and already referenced (BlockArena.lookup):
        positions 0..len(blocks) * block_size - 1 are computed."""
        if self.blocks:
            raise RuntimeError("adopt() needs an empty sequence")
        self.blocks = list(blocks)
        run = 1 if blocks and blocks[0] != HOLE else 0
        while run < len(blocks) and blocks[run] == blocks[run - 1] + 1:
            run += 1
        self._run = run
        self.length = len(blocks) * self.arena.block_size

    def release(self) -> None:
        """Give every block back (finish, cancel, preemption)."""
        self.arena.free(self.held)
        self.blocks = []
        self.length = 0
        self._run = 0

    def forget_before(self, position: int) -> int:
        """Give back the blocks wholly before `position` (no query will read them again: they
        fell out of every sliding window); returns how many went back."""
        gone = [i for i in range(min(position // self.arena.block_size, len(self.blocks)))
                if self.blocks[i] != HOLE]
        self.arena.free([self.blocks[i] for i in gone])
        for i in gone:
            self.blocks[i] = HOLE
        return len(gone)

    def _slots(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, start + n)
        bs = self.arena.block_size
        return np.asarray(self.blocks)[pos // bs], pos % bs

    def layer_views(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole reserved cache of a layer as SequenceKV's (n_kv_heads, capacity, head_dim)
        views of the arena when this sequence's blocks are consecutive there (None otherwise:
        split, or with holes after a window passed). Not `read`: that returns float32 copies of
        an f16 arena, and the fused layer writes the token's key and value through these."""
        if not self.blocks or self._run != len(self.blocks) or HOLE in self.blocks:
            return None
        first, n, bs = self.blocks[0], len(self.blocks), self.arena.block_size
        k, v = self.arena.k[layer], self.arena.v[layer]
        n_kv, _, _, hd = k.shape
        return (k[:, first:first + n].reshape(n_kv, n * bs, hd), v[:, first:first + n].reshape(n_kv, n * bs, hd))

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v of shape (n, n_kv_heads, head_dim) for positions start..start+n-1."""
        if start + k.shape[0] > self.capacity:
            raise ContextOverflow(f"write past the reserved {self.capacity} positions")
        blocks, slots = self._slots(start, k.shape[0])
        self.arena.k[layer][:, blocks, slots] = k.transpose(1, 0, 2)
        self.arena.v[layer][:, blocks, slots] = v.transpose(1, 0, 2)

    def read(self, layer: int, end: int, begin: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values for positions begin..end-1, (n_kv_heads, end - begin, head_dim): a view
        when contiguous. A sliding-window layer reads only its window's blocks."""
        bs = self.arena.block_size
        first, nb = begin // bs, -(-end // bs)
        table = self.blocks[first:nb]
        k_layer, v_layer = self.arena.k[layer], self.arena.v[layer]
        n_kv, _, _, hd = k_layer.shape
        if nb <= self._run:
            k = k_layer[:, table[0]:table[0] + len(table)]  # consecutive blocks: a plain view
            v = v_layer[:, table[0]:table[0] + len(table)]
        else:
            k = k_layer[:, table]
            v = v_layer[:, table]
        lo, hi = begin - first * bs, end - first * bs
        k, v = k.reshape(n_kv, len(table) * bs, hd)[:, lo:hi], v.reshape(n_kv, len(table) * bs, hd)[:, lo:hi]
        if k.dtype != np.float32:  # an f16 arena halves memory; attention still runs in f32
            k, v = k.astype(np.float32), v.astype(np.float32)
        return k, v


class PagedStep:
    """One forward step's use of the arena, worked out once and used by every layer: where
    each new token's key and value go, and the block tables of the sequences decoding one
    token (their attention reads the arena through these tables, see
    `Backend.paged_decode_attention`)."""

    def __init__(self, kvs: list[PagedKV], starts: list[int], counts: list[int], decoders: list[int]):
        self.arena = arena = kvs[0].arena
        bs = arena.block_size
        blocks, slots = [], []
        for kv, start, n in zip(kvs, starts, counts):
            if kv.arena is not arena:
                raise ValueError("a step's sequences must share one arena")
            if start + n > kv.capacity:
                raise ContextOverflow(f"write past the reserved {kv.capacity} positions")
            pos = np.arange(start, start + n)
            blocks.append(np.asarray(kv.blocks, dtype=np.int64)[pos // bs])
            slots.append(pos % bs)
        self._blocks, self._slots = np.concatenate(blocks), np.concatenate(slots)
        # decoders: (B, nb) block tables padded with block 0 (never read: lengths bound the keys)
        self.lengths = np.array([starts[i] + counts[i] for i in decoders], dtype=np.int64)
        nb = int(max(-(-self.lengths // bs))) if decoders else 0
        self.table = np.zeros((len(decoders), nb), dtype=np.int64)
        for row, i in enumerate(decoders):
            own = kvs[i].blocks[:-(-int(self.lengths[row]) // bs)]
            self.table[row, :len(own)] = [max(b, 0) for b in own]  # holes: never read (window)

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (sum(counts), n_kv, hd) of every new token into its sequence's blocks: one scatter."""
        self.arena.k[layer][:, self._blocks, self._slots] = k.transpose(1, 0, 2)
        self.arena.v[layer][:, self._blocks, self._slots] = v.transpose(1, 0, 2)

    def pages(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One layer of the arena: keys and values, (n_kv, num_blocks, block_size, hd) each."""
        return self.arena.k[layer], self.arena.v[layer]
