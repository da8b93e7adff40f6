"""Block geometry lives in one table, backends/quants.py's QUANT_TYPES (checked bit-exact
against gguf-py by the quants tests). The CUDA programs get theirs from it as defines; the C
extension's copy (ops_avx2.h: the QT_ type numbers and the QFORMATS table) is checked here, so
any difference fails."""

from __future__ import annotations

import re

from gguf import GGMLQuantizationType as T
from paths import REPO

from backends.cuda.kernels import DEVICE_TYPES, QUANT_SOURCE, quant_program
from backends.quants import QUANT_TYPES

HEADER = (REPO / "backends" / "cpu" / "ops_avx2" / "ops_avx2.h").read_text()


def _c_constants() -> dict[str, int]:
    return {name: int(value) for name, value in re.findall(r"^#define (QK|QK_K)\s+(\d+)", HEADER, flags=re.M)}


def test_the_c_type_numbers_are_ggmls():
    numbers = dict(re.findall(r"\bQT_(\w+)\s*=\s*(\d+)", HEADER))
    assert numbers, "no QT_ enum found in ops_avx2.h"
    for name, number in numbers.items():
        assert T[name].value == int(number), name


def test_the_c_block_table_is_the_quants_table():
    consts = _c_constants()
    rows = re.findall(r"\{QT_(\w+),\s*(QK_K|QK|\d+),\s*(\d+),", HEADER)
    assert len(rows) >= 12, rows
    for name, block, size in rows:
        qt = QUANT_TYPES[T[name]]
        assert (consts.get(block, None) or int(block), int(size)) == (qt.block_size, qt.type_size), name


def test_cuda_programs_take_their_geometry_from_the_quants_table():
    assert not re.search(r"^#define (QK|QTS) ", QUANT_SOURCE, flags=re.M)  # no copy in the source
    for t, dt in DEVICE_TYPES.items():
        if t not in (T.F16, T.F32):  # float rows: walked in blocks of 8 weights
            qt = QUANT_TYPES[t]
            assert (dt.block_size, dt.type_size) == (qt.block_size, qt.type_size), t.name
            assert quant_program(t).defines["QK"] == qt.block_size and quant_program(t).defines["QTS"] == qt.type_size
