"""The CUDA kernels without a GPU: NVRTC compilation, PoCL execution against numpy, Oclgrind races.

The table of every check (kernel × weight type × shape × check) is printed to the terminal at the
end of this module whatever pytest's capture setting. Each kind of check skips, saying which
package is missing, when its tooling is not installed (`pip install -e '.[kernels-check]'`);
CI installs it.
"""

from __future__ import annotations

import pytest

from backends.cuda import kernel_check
from backends.cuda.opencl import opencl_available

ROWS: list[kernel_check.Row] = []


def _check(rows: list[kernel_check.Row]) -> None:
    ROWS.extend(rows)
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + kernel_check.format_table(failed)


def test_nvrtc_compiles_every_kernel_for_sm80_and_sm90_without_spills():
    ok, reason = kernel_check.nvrtc_available()
    if not ok:
        pytest.skip(reason)
    rows = kernel_check.nvrtc_rows()
    assert {r.check for r in rows} == {"nvrtc sm_80", "nvrtc sm_90"}
    _check(rows)


def test_kernels_match_numpy_on_pocl():
    ok, reason = opencl_available("pocl")
    if not ok:
        pytest.skip(reason)
    rows = kernel_check.pocl_rows()
    assert len(rows) == len(kernel_check.pocl_cases())
    _check(rows)


def test_kernels_have_no_races_under_oclgrind():
    ok, reason = opencl_available("oclgrind")
    if not ok:
        pytest.skip(reason)
    rows = kernel_check.oclgrind_rows()
    assert len(rows) == len(kernel_check.oclgrind_cases())
    _check(rows)


def test_every_kernel_and_weight_type_is_covered():
    """The checks name every kernel of every program, so a new kernel cannot go unchecked."""
    from backends.cuda.kernels import all_programs
    kernels = {k for spec in all_programs() for k in spec.kernels}
    executed = {case[0] for case in kernel_check.pocl_cases()}
    raced = {case[0] for case in kernel_check.oclgrind_cases()}
    assert kernels - executed == set(), "kernels never executed on PoCL"
    assert kernels - raced == set(), "kernels never run under Oclgrind"


def test_print_kernel_table(capsys):
    """Last in the module: the whole table, on the terminal even when output is captured."""
    if not ROWS:
        pytest.skip("no kernel check ran (kernel-check tooling not installed)")
    with capsys.disabled():
        print("\n\nCUDA kernel checks (backends/cuda/kernel_check.py)\n" + kernel_check.format_table(ROWS))
    assert all(r.passed for r in ROWS)
