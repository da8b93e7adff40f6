"""Paged KV cache: fixed-size blocks from one preallocated arena, a block table per sequence.

The arena holds keys and values for `num_blocks` blocks of `block_size`
positions, laid out (n_layers, n_kv_heads, num_blocks, block_size, head_dim) so
that a run of consecutive blocks is one contiguous (t, head_dim) range per kv
head: attention over a sequence whose blocks are consecutive reads a view, and
only a fragmented sequence pays a gather copy. The allocator therefore hands a
growing sequence the block right after its last one when it is free.

Running out of blocks is a return value (`reserve() -> False`), not an
exception: the scheduler preempts a sequence and retries.
"""

from __future__ import annotations

import heapq

import numpy as np

from engine.errors import ContextOverflow


class BlockArena:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: np.dtype = np.float32):
        shape = (n_layers, n_kv_heads, num_blocks, block_size, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = 2 * n_layers * n_kv_heads * block_size * head_dim * np.dtype(dtype).itemsize
        self._free_heap = list(range(num_blocks))  # lowest block first
        self._free = set(self._free_heap)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """n blocks, preferring the run right after block `after`; None if fewer than n are free."""
        if n > len(self._free):
            return None
        out = []
        nxt = None if after is None else after + 1
        while len(out) < n and nxt is not None and nxt in self._free:
            self._free.discard(nxt)
            out.append(nxt)
            nxt += 1
        while len(out) < n:
            block = heapq.heappop(self._free_heap)
            if block in self._free:  # entries taken by the run above are stale in the heap
                self._free.discard(block)
                out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b in self._free:
                raise RuntimeError(f"block {b} freed twice")
            self._free.add(b)
            heapq.heappush(self._free_heap, b)
        if len(self._free_heap) > 4 * self.num_blocks:  # drop stale heap entries now and then
            self._free_heap = sorted(self._free)

    def stats(self) -> dict[str, int]:
        return {"blocks_total": self.num_blocks, "blocks_used": self.used_blocks, "blocks_free": self.free_blocks,
                "block_size": self.block_size, "bytes_total": self.num_blocks * self.block_bytes,
                "bytes_used": self.used_blocks * self.block_bytes}


class PagedKV:
    """One sequence's cache: a block table into the arena. Same interface as `SequenceKV`."""

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
    def nbytes(self) -> int:
        return len(self.blocks) * self.arena.block_bytes

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

    def release(self) -> None:
        """Give every block back (finish, cancel, preemption)."""
        self.arena.free(self.blocks)
        self.blocks = []
        self.length = 0
        self._run = 0

    def _slots(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, start + n)
        bs = self.arena.block_size
        return np.asarray(self.blocks)[pos // bs], pos % bs

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
            self.table[row, :len(own)] = own

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (sum(counts), n_kv, hd) of every new token into its sequence's blocks: one scatter."""
        self.arena.k[layer][:, self._blocks, self._slots] = k.transpose(1, 0, 2)
        self.arena.v[layer][:, self._blocks, self._slots] = v.transpose(1, 0, 2)

    def pages(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One layer of the arena: keys and values, (n_kv, num_blocks, block_size, hd) each."""
        return self.arena.k[layer], self.arena.v[layer]
