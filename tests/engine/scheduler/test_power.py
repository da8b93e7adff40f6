"""The power governor (engine/scheduler/power.py) on a fake meter and clock: no model, no sleeping."""

from __future__ import annotations

import pytest

from engine.scheduler.power import PowerGovernor
from engine.telemetry.energy import PowerMeter


class FakeMeter(PowerMeter):
    """100 W while the fake engine is busy, nothing while it idles."""

    source = "fake"

    def __init__(self, clock):
        self.clock = clock
        self.joules = 0.0

    def energy_j(self) -> float:
        return self.joules


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("cap", [20.0, 50.0, 80.0])
def test_power_cap_holds_within_ten_percent(cap):
    clock = FakeClock()
    meter = FakeMeter(clock)

    def sleep(s):
        clock.t += s

    governor = PowerGovernor(meter, max_watts=cap, window_s=2.0, clock=clock, sleep=sleep)
    start_t, start_j = clock.t, meter.joules
    for _ in range(2000):  # steps of 10 ms at 100 W
        clock.t += 0.01
        meter.joules += 1.0
        governor.after_step(1.0, 0.01)
    average = (meter.joules - start_j) / (clock.t - start_t)
    assert abs(average - cap) / cap < 0.10, average
    assert governor.watts() <= cap * 1.10


def test_no_cap_never_sleeps():
    clock = FakeClock()
    governor = PowerGovernor(FakeMeter(clock), max_watts=0.0, clock=clock, sleep=lambda s: pytest.fail("slept"))
    assert governor.after_step(5.0, 0.01) == 0.0
