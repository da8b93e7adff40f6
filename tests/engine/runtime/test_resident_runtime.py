"""The runtime's resident-backend path, on the CPU.

A resident backend (the CUDA backend, as `create_backend("cuda")` makes it) returns arrays of its
own array module and keeps the caches it makes in its own memory, while the engine worker's paged
arena stays in host memory. `Transformer.forward` has branches for both that only a GPU would
reach; here a CPU backend poses as a resident one -- its "device" arrays are numpy arrays behind
an array module that is not numpy -- so CI runs them and checks them bit for bit against the plain
CPU backend (the same ops on the same numbers). tests/backends/cuda runs them on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from paths import FIXTURES

from backends.cpu.backend import CpuBackend
from engine.execution import kernel_settings
from engine.memory.kv_cache import SequenceKV
from engine.memory.paged import BlockArena, PagedKV
from engine.model.gguf_file import ModelFile
from engine.runtime.model import Segment, Transformer, load_weights

MODEL = FIXTURES / "arch" / "llama.gguf"


class _DeviceNumpy:
    """The array module a resident backend names: numpy's functions, but not numpy itself."""

    empty = staticmethod(np.empty)
    asarray = staticmethod(np.asarray)
    concatenate = staticmethod(np.concatenate)


class _DeviceKV(SequenceKV):
    """A cache the backend made (`new_kv`), as a DeviceSequenceKV is on a GPU."""


class ResidentCpu(CpuBackend):
    resident = True

    def __init__(self) -> None:
        super().__init__(kernel_settings())
        self.copies_to_host = 0

    @property
    def xp(self):
        return _DeviceNumpy

    def to_host(self, a):
        self.copies_to_host += 1
        return np.array(a)

    def holds_cache(self, kv) -> bool:
        return isinstance(kv, _DeviceKV)

    def new_kv(self, n_layers, n_kv_heads, head_dim, capacity):
        return _DeviceKV(n_layers, n_kv_heads, head_dim, capacity)

    def fuses_decode(self, layer) -> bool:
        return False  # the general path, as on a GPU


@pytest.fixture(scope="module")
def pair():
    """The same model on the plain CPU backend and on the resident-posing one."""
    file = ModelFile(MODEL)
    config = file.config()
    models = []
    for be in (CpuBackend(kernel_settings()), ResidentCpu()):
        models.append(Transformer(config, load_weights(file, config, be, "f32"), be))
    yield models
    file.close()


def _ids(n: int) -> list[int]:
    return [int(t) for t in np.load(FIXTURES / "arch" / "llama.npz")["teacher_ids"][:n]]


def test_own_caches_one_copy_to_the_host_a_step(pair):
    """Caches from new_kv: prefill then decode, the plain backend's logits bit for bit, and the
    only copy to the host each step is the logits."""
    plain, resident = pair
    ids = _ids(24)
    kvs = [m.new_kv(len(ids)) for m in pair]
    assert isinstance(kvs[1], _DeviceKV) and not isinstance(kvs[0], _DeviceKV)
    resident.backend.copies_to_host = 0
    for lo, hi in ((0, 16), *((p, p + 1) for p in range(16, 24))):
        want = plain.forward([Segment(kvs[0], np.array(ids[lo:hi]), lo)])[0]
        got = resident.forward([Segment(kvs[1], np.array(ids[lo:hi]), lo)])[0]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, want)
    assert resident.backend.copies_to_host == 9  # one a step: the logits


def test_worker_arena_in_host_memory(pair):
    """Two sequences paging one host arena (a prompt chunk beside a decoder, then both decoding,
    attention over the arena in one call): the plain backend's logits bit for bit; each layer's
    new keys and values come to the host once a step."""
    config = pair[0].config
    ids = _ids(30)
    outs = []
    for m in pair:
        arena = BlockArena(config.n_layers, config.n_kv_heads, config.head_dim, num_blocks=16, block_size=8)
        seqs = [PagedKV(arena, 40), PagedKV(arena, 40)]
        assert all(kv.reserve(len(ids)) for kv in seqs)
        m.backend.copies_to_host = 0
        steps = [m.forward([Segment(seqs[0], np.array(ids[:20]), 0, "all"),
                            Segment(seqs[1], np.array(ids[:5]), 0, "last")])]
        steps.append(m.forward([Segment(seqs[1], np.array(ids[5:20]), 5, "last"),
                                Segment(seqs[0], np.array(ids[20:21]), 20, "last")]))
        for pos in range(20, 30):
            steps.append(m.forward([Segment(kv, np.array([ids[pos + (kv is seqs[0])]]), pos + (kv is seqs[0]))
                                    for kv in seqs if pos + (kv is seqs[0]) < 30]))
        outs.append((steps, m.backend.copies_to_host))
    (want, _), (got, copies) = outs
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(y, x)
    assert copies == len(got) * (1 + 2 * config.n_layers)  # the logits, and each layer's k and v
