"""The power cap: keep the rolling average power under the plan's `max_watts` by duty cycle.

After each engine step the governor knows the step's joules `e` and duration
`d`. Idling for `s = e / cap - d` seconds afterwards brings that step's average
to the cap (idle power counted as zero for the estimator; a RAPL or NVML meter
also charges idle power, which the window check below then corrects). A second
check over the rolling window catches drift: while the window's average is over
the cap, the governor keeps idling in short slices. Batch size and threads stay
the policy's and the plan's: idling is the lever that works for every policy.
"""

from __future__ import annotations

import time
from typing import Callable

from engine.telemetry.energy import PowerMeter, PowerWindow

MAX_SLEEP_S = 1.0  # never idle longer than this in one go, so cancellation stays prompt


class PowerGovernor:
    def __init__(self, meter: PowerMeter, max_watts: float = 0.0, window_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.meter = meter
        self.max_watts = max_watts
        self.window = PowerWindow(meter, window_s=window_s, clock=clock)
        self._clock = clock
        self._sleep = sleep
        self.idle_s = 0.0  # total time spent idling for the cap
        self.window.sample()

    @property
    def source(self) -> str:
        return self.meter.source

    def watts(self) -> float:
        return self.window.watts()

    def after_step(self, step_joules: float, step_seconds: float) -> float:
        """Idle as needed after a step; returns the seconds slept."""
        self.window.sample()
        cap = self.max_watts
        if cap <= 0:
            return 0.0
        slept = 0.0
        owed = step_joules / cap - step_seconds
        if owed > 0:
            slept += self._idle(min(owed, MAX_SLEEP_S))
        while self.window.watts() > cap and slept < MAX_SLEEP_S:
            slept += self._idle(0.01)
        return slept

    def _idle(self, seconds: float) -> float:
        self._sleep(seconds)
        self.window.sample()
        self.idle_s += seconds
        return seconds
