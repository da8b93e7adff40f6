"""Power meters on a fake powercap tree and fake clocks; attribution by token share."""

from __future__ import annotations

import os
import sys
import time
import types

import pytest

from engine.errors import InvalidArgument
from engine.telemetry.energy import (
    CpuTimeEstimator,
    EnergyAccount,
    MeterUnavailable,
    NvmlMeter,
    PowerMeter,
    PowerWindow,
    RaplMeter,
    default_meter,
)

MAX_RANGE_UJ = 262_143_328_850


def make_zone(root, name, label, energy_uj, max_range=MAX_RANGE_UJ):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def set_energy(zone, uj):
    (zone / "energy_uj").write_text(f"{uj}\n")


@pytest.fixture
def powercap(tmp_path):
    """Two packages, each with core/dram sub-zones, plus a psys zone and an mmio duplicate."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control-type directory: no counters
    pkg0 = make_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    pkg1 = make_zone(root, "intel-rapl:1", "package-1", 5_000_000)
    subs = [make_zone(root, "intel-rapl:0:0", "core", 400_000),
            make_zone(root, "intel-rapl:0:1", "dram", 100_000),
            make_zone(root, "intel-rapl:1:0", "core", 900_000),
            make_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000),
            make_zone(root, "intel-rapl:2", "psys", 7_000_000)]
    return root, pkg0, pkg1, subs


def test_rapl_sums_packages_and_ignores_sub_zones(powercap):
    root, pkg0, pkg1, subs = powercap
    meter = RaplMeter(root)
    assert meter.source == "rapl"
    assert meter.zones == ["intel-rapl:0", "intel-rapl:1"]
    assert meter.energy_j() == 0.0
    set_energy(pkg0, 3_500_000)    # +2.5 J
    set_energy(pkg1, 6_000_000)    # +1.0 J
    for z in subs:                 # sub-zones move too; counting them would add 100 J
        set_energy(z, 20_000_000)
    assert meter.energy_j() == pytest.approx(3.5)
    set_energy(pkg1, 6_250_000)    # +0.25 J
    assert meter.energy_j() == pytest.approx(3.75)
    assert meter.energy_j() == pytest.approx(3.75)  # no change, no drift
    meter.close()


def test_rapl_unwraps_one_package_counter(powercap):
    root, pkg0, pkg1, _ = powercap
    meter = RaplMeter(root)
    set_energy(pkg0, MAX_RANGE_UJ - 500_000)          # +(MAX - 1.5 J) from 1 J
    first = meter.energy_j()
    assert first == pytest.approx((MAX_RANGE_UJ - 1_500_000) / 1e6)
    set_energy(pkg0, 2_000_000)                       # wrapped: 0.5 J to the top, then 2 J
    set_energy(pkg1, 5_100_000)                       # +0.1 J, no wrap
    assert meter.energy_j() - first == pytest.approx(2.5 + 0.1)


def test_amd_rapl_zones_are_read(tmp_path):
    root = tmp_path / "powercap"
    zone = make_zone(root, "amd-rapl:0", "package-0", 10)
    meter = RaplMeter(root)
    set_energy(zone, 2_000_010)
    assert meter.energy_j() == pytest.approx(2.0)


def test_rapl_unavailable_when_absent_or_unreadable(tmp_path, powercap):
    assert not RaplMeter.available(tmp_path / "nothing-here")
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(tmp_path / "nothing-here")

    root, pkg0, _, _ = powercap
    assert RaplMeter.available(root)
    if os.geteuid() == 0:
        # root reads mode-000 files; break the counter instead
        set_energy(pkg0, "not-a-number")
    else:
        (pkg0 / "energy_uj").chmod(0o000)  # as on kernels since the 2020 RAPL side-channel fix
    assert not RaplMeter.available(root)
    with pytest.raises(MeterUnavailable, match="not readable"):
        RaplMeter(root)


def test_default_meter_falls_back_to_estimator(tmp_path, powercap):
    meter = default_meter(rapl_root=tmp_path / "nothing-here")
    assert isinstance(meter, CpuTimeEstimator) and meter.source == "estimated"
    assert default_meter(rapl_root=powercap[0]).source == "rapl"
    with pytest.raises(MeterUnavailable):
        default_meter("rapl", rapl_root=tmp_path / "nothing-here")
    with pytest.raises(InvalidArgument, match="unknown power source"):
        default_meter("wattmeter")


def test_estimator_grows_with_cpu_work():
    meter = CpuTimeEstimator(watts_per_core=10.0)
    assert meter.source == "estimated"
    before = meter.energy_j()
    cpu0 = time.process_time()
    x = 0
    while time.process_time() - cpu0 < 0.05:  # burn ~50 ms of CPU
        x += sum(range(1000))
    after = meter.energy_j()
    assert after - before >= 10.0 * 0.05 * 0.9
    assert after >= before


def test_estimator_model_with_fake_clocks():
    cpu, wall = [100.0], [50.0]
    meter = CpuTimeEstimator(watts_per_core=12.0, idle_watts=3.0,
                             cpu_clock=lambda: cpu[0], wall_clock=lambda: wall[0])
    cpu[0] += 2.0      # 2 CPU-seconds
    wall[0] += 10.0    # over 10 wall seconds
    assert meter.energy_j() == pytest.approx(2.0 * 12.0 + 10.0 * 3.0)
    with pytest.raises(InvalidArgument):
        CpuTimeEstimator(watts_per_core=-1.0)


class FakeMeter(PowerMeter):
    source = "estimated"

    def __init__(self):
        self.joules = 0.0

    def energy_j(self) -> float:
        return self.joules


def test_power_window_rolling_average():
    meter, now = FakeMeter(), [0.0]
    window = PowerWindow(meter, window_s=5.0, clock=lambda: now[0])
    assert window.watts() == 0.0
    # 10 W for 10 s, then 50 W: sample once per second
    for t in range(1, 21):
        meter.joules += 10.0 if t <= 10 else 50.0
        now[0] = float(t)
        window.sample()
        if t == 1:
            # samples at t=0 missing: one sample gives no rate yet
            assert window.watts() == 0.0
    # the last 5 s (15..20) are all at 50 W
    assert window.watts() == pytest.approx(50.0)
    now[0], meter.joules = 22.0, meter.joules + 20.0  # 10 W for the last 2 s
    window.sample()
    # window 17..22: 3 s at 50 W + 2 s at 10 W = 170 J / 5 s
    assert window.watts() == pytest.approx(34.0)
    assert window.joules_between(15.0, 20.0) == pytest.approx(250.0)
    assert window.joules_between(20.0, 21.0) == pytest.approx(10.0)   # interpolated
    with pytest.raises(InvalidArgument):
        window.joules_between(-100.0, 20.0)


def test_power_window_spans_a_sparse_window():
    meter, now = FakeMeter(), [0.0]
    window = PowerWindow(meter, window_s=5.0, clock=lambda: now[0])
    window.sample()
    now[0], meter.joules = 8.0, 80.0   # one sample 8 s later: average over what we have
    window.sample()
    assert window.watts() == pytest.approx(10.0)


def test_energy_account_splits_by_token_share():
    meter = FakeMeter()
    account = EnergyAccount(meter)
    meter.joules = 5.0                          # idle before any step
    with account.step({"a": 96, "b": 32}):      # two prefills in one step
        meter.joules += 12.8
    with account.step({"a": 1, "b": 1, "c": 2}):  # decodes + a two-token chunk
        meter.joules += 4.0
    assert account.unattributed_j == pytest.approx(5.0)  # the idle joules belong to no one
    account.record_step(3.0, {"b": 1})                   # joules measured elsewhere
    account.record_step(1.0, {})                # an empty step attributes nothing
    assert account.joules("a") == pytest.approx(12.8 * 96 / 128 + 4.0 / 4)
    assert account.joules("b") == pytest.approx(12.8 * 32 / 128 + 4.0 / 4 + 3.0)
    assert account.joules("c") == pytest.approx(4.0 * 2 / 4)
    assert account.attributed_j == pytest.approx(12.8 + 4.0 + 3.0)
    assert account.pop("a") == pytest.approx(10.6)
    assert account.joules("a") == 0.0
    with pytest.raises(InvalidArgument):
        account.record_step(-1.0, {"b": 1})
    assert account.joules("b") == pytest.approx(12.8 * 32 / 128 + 4.0 / 4 + 3.0)


def test_energy_account_meters_a_failing_step():
    meter = FakeMeter()
    account = EnergyAccount(meter)
    with pytest.raises(RuntimeError), account.step({"a": 1}):
        meter.joules += 2.0
        raise RuntimeError("forward failed")
    assert account.joules("a") == pytest.approx(2.0)


# --- NVML: no GPU here, so a missing library and a fake pynvml ------------------------------


def test_nvml_without_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(MeterUnavailable, match="nvidia-ml-py"):
        NvmlMeter()
    with pytest.raises(MeterUnavailable):
        default_meter("nvml")


def fake_pynvml(*, energy_supported=True, init_fails=False):
    mod = types.ModuleType("pynvml")
    mod.state = {"energy_mj": 1_000_000, "power_mw": 100_000, "inits": 0}

    class NVMLError(Exception):
        pass

    def init():
        if init_fails:
            raise NVMLError("Driver Not Loaded")
        mod.state["inits"] += 1

    def shutdown():
        mod.state["inits"] -= 1

    def total_energy(handle):
        if not energy_supported:
            raise NVMLError("Not Supported")
        return mod.state["energy_mj"]

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    mod.nvmlDeviceGetTotalEnergyConsumption = total_energy
    mod.nvmlDeviceGetPowerUsage = lambda handle: mod.state["power_mw"]
    return mod


def test_nvml_energy_counter(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = NvmlMeter(0)
    assert meter.source == "nvml" and meter.mode == "counter"
    assert meter.energy_j() == 0.0
    nvml.state["energy_mj"] += 2_500
    assert meter.energy_j() == pytest.approx(2.5)
    meter.close()
    meter.close()
    assert nvml.state["inits"] == 0
    with pytest.raises(MeterUnavailable, match="closed"):
        meter.energy_j()


def test_nvml_integrates_power_when_no_counter(monkeypatch):
    nvml = fake_pynvml(energy_supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    now = [0.0]
    meter = NvmlMeter(0, clock=lambda: now[0])
    assert meter.mode == "sampled"
    now[0], nvml.state["power_mw"] = 2.0, 200_000   # 100 W -> 200 W over 2 s: trapezoid 300 J
    assert meter.energy_j() == pytest.approx(300.0)
    now[0] = 3.0                                     # 200 W for 1 s
    assert meter.energy_j() == pytest.approx(500.0)


def test_nvml_errors_are_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    with pytest.raises(MeterUnavailable, match="Driver Not Loaded"):
        NvmlMeter()
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(MeterUnavailable, match="out of range"):
        NvmlMeter(3)
    assert nvml.state["inits"] == 0  # shut down again after the failure
