"""Power meters and energy attribution, each figure labelled with where it came from.

Three sources, chosen in this order by `default_meter`:

- ``rapl``: Linux powercap (Intel RAPL, and AMD's RAPL-compatible counters) — package
  energy counters measured by the CPU itself.
- ``nvml``: an NVIDIA GPU's own energy counter (or its power readings, integrated).
- ``estimated``: this process's CPU time × an assumed watts per core. A model, not a
  measurement; it is the only one available on the VMs this project is developed on.

A `PowerMeter` is a cumulative joule counter from its creation. On top of one:
`PowerWindow` gives a rolling-average power (for the ``max_watts`` cap and the
``power_watts`` gauge), and `EnergyAccount` splits each engine step's joules over the
sequences in that step by token share (for the per-request ``energy_j`` in a Generate
result).
"""

from __future__ import annotations

import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Self

from engine.errors import FailedPrecondition, InvalidArgument

SOURCES = ("rapl", "nvml", "estimated")
RAPL_ROOT = "/sys/class/powercap"


class MeterUnavailable(FailedPrecondition):
    """The requested power source cannot be read on this machine (absent, no permission, no driver)."""


class PowerMeter(ABC):
    """A cumulative energy counter: joules since the meter was created, never decreasing."""

    source: str  # "rapl" | "nvml" | "estimated"

    @abstractmethod
    def energy_j(self) -> float:
        """Joules consumed since this meter was created (monotonic)."""

    def close(self) -> None:
        """Release what the meter holds (files, driver handles). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r})"


# ---------------------------------------------------------------------------------------------
# RAPL through the powercap sysfs tree

# Top-level package zones only. Sub-zones (`intel-rapl:0:0` core, `:0:1` uncore, `:0:2` dram)
# are parts of their package and would double count. `intel-rapl-mmio:N` is a second interface
# onto the same package counter on some Intel client chips, so it is skipped too.
_PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:\d+$")
# The "psys" (platform) zone, where present, covers the whole SoC including the packages.
_SKIPPED_ZONE_NAMES = frozenset({"psys"})


def _rapl_zones(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    zones = []
    for entry in sorted(root.iterdir()):
        if not _PACKAGE_ZONE.match(entry.name):
            continue
        name_file = entry / "name"
        try:
            name = name_file.read_text().strip() if name_file.exists() else ""
        except OSError:
            name = ""
        if name in _SKIPPED_ZONE_NAMES:
            continue
        zones.append(entry)
    return zones


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class _RaplZone:
    def __init__(self, path: Path):
        self.path = path
        self.max_range_uj = _read_int(path / "max_energy_range_uj")
        if self.max_range_uj <= 0:
            raise ValueError(f"{path}/max_energy_range_uj is {self.max_range_uj}")
        self.last_uj = _read_int(path / "energy_uj")

    def advance(self) -> int:
        """Microjoules since the previous read, unwrapping one counter wrap."""
        now_uj = _read_int(self.path / "energy_uj")
        delta = now_uj - self.last_uj
        if delta < 0:
            # The counter wrapped at max_energy_range_uj. Two or more wraps between reads
            # cannot be told from one; see RaplMeter's docstring.
            delta += self.max_range_uj
        self.last_uj = now_uj
        return delta


class RaplMeter(PowerMeter):
    """Sum of the CPU packages' energy counters from `/sys/class/powercap`.

    Reads every top-level package zone (`intel-rapl:N`, `amd-rapl:N`) and ignores sub-zones
    (core, uncore, dram: they are inside their package) and the `psys` platform zone.

    Wraparound: each `energy_uj` wraps at `max_energy_range_uj` (about 262 kJ on current
    Intel parts: some 15–45 minutes at package powers of 100–300 W). One wrap between two
    reads is unwrapped; several are indistinguishable from one, so `energy_j()` must be
    called more often than one wrap period — calling it every engine step, or from a
    `PowerWindow` sampled every few seconds, is far inside that.

    Since Linux 5.10 (CVE-2020-8694) `energy_uj` is readable by root only on most
    distributions; `available()` is then False and `default_meter` falls back to the
    estimator. Thread-safe.
    """

    source = "rapl"

    def __init__(self, root: str | os.PathLike = RAPL_ROOT):
        self.root = Path(root)
        paths = _rapl_zones(self.root)
        if not paths:
            raise MeterUnavailable(f"no RAPL package zones under {self.root} (no powercap driver, or not Linux)")
        try:
            self._zones = [_RaplZone(p) for p in paths]
        except (OSError, ValueError) as e:
            raise MeterUnavailable(f"RAPL counters under {self.root} are not readable: {e}") from e
        self._lock = threading.Lock()
        self._total_uj = 0

    @staticmethod
    def available(root: str | os.PathLike = RAPL_ROOT) -> bool:
        """True when at least one package zone exists and all of them can be read."""
        try:
            RaplMeter(root).close()
        except MeterUnavailable:
            return False
        return True

    @property
    def zones(self) -> list[str]:
        return [z.path.name for z in self._zones]

    def energy_j(self) -> float:
        with self._lock:
            try:
                self._total_uj += sum(z.advance() for z in self._zones)
            except (OSError, ValueError) as e:
                raise MeterUnavailable(f"RAPL counter read failed: {e}") from e
            return self._total_uj / 1e6


# ---------------------------------------------------------------------------------------------
# NVML (nvidia-ml-py, the `cuda` extra)


def _import_pynvml():
    try:
        import pynvml  # optional (the cuda extra), so imported on first use
    except ImportError as e:
        raise MeterUnavailable(
            "NVML power metering needs nvidia-ml-py (pip install 'plan-engine[cuda]')") from e
    return pynvml


class NvmlMeter(PowerMeter):
    """Energy of one NVIDIA GPU through NVML.

    Uses the driver's cumulative energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ,
    Volta and newer) when supported (`mode == "counter"`). Otherwise (`mode == "sampled"`)
    it integrates `nvmlDeviceGetPowerUsage` (mW) by the trapezoid rule between successive
    `energy_j()` calls, so its accuracy depends on calling it often (every engine step, or a
    `PowerWindow` sampled every second or so). Covers the GPU board only, not the host CPU.
    """

    source = "nvml"

    def __init__(self, device_index: int = 0, *, clock: Callable[[], float] = time.monotonic):
        nvml = _import_pynvml()
        self._nvml = nvml
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise MeterUnavailable(f"NVML could not start (no NVIDIA driver?): {e}") from e
        try:
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= device_index < count:
                raise MeterUnavailable(f"GPU index {device_index} out of range: NVML sees {count} device(s)")
            self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
            try:
                self._last_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                self.mode = "counter"
            except nvml.NVMLError:
                self._last_mw = nvml.nvmlDeviceGetPowerUsage(self._handle)
                self._last_t = clock()
                self.mode = "sampled"
        except MeterUnavailable:
            nvml.nvmlShutdown()
            raise
        except nvml.NVMLError as e:
            nvml.nvmlShutdown()
            raise MeterUnavailable(f"NVML cannot meter GPU {device_index}: {e}") from e
        self.device_index = device_index
        self._total_j = 0.0

    def energy_j(self) -> float:
        with self._lock:
            if self._closed:
                raise MeterUnavailable("NVML meter is closed")
            try:
                if self.mode == "counter":
                    now_mj = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                    self._total_j += max(0, now_mj - self._last_mj) / 1e3
                    self._last_mj = now_mj
                else:
                    now_mw = self._nvml.nvmlDeviceGetPowerUsage(self._handle)
                    now_t = self._clock()
                    dt = max(0.0, now_t - self._last_t)
                    self._total_j += 0.5 * (self._last_mw + now_mw) / 1e3 * dt
                    self._last_mw, self._last_t = now_mw, now_t
            except self._nvml.NVMLError as e:
                raise MeterUnavailable(f"NVML read failed on GPU {self.device_index}: {e}") from e
            return self._total_j

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._nvml.nvmlShutdown()


# ---------------------------------------------------------------------------------------------
# The estimator


class CpuTimeEstimator(PowerMeter):
    """energy = CPU seconds of this process × watts_per_core + idle_watts × wall seconds.

    A model, labelled "estimated", for machines without a readable meter. Its limits:
    - only this process's CPU time (all its threads, BLAS included) is counted; other
      processes on the machine, DRAM, uncore and the rest of the platform are not;
    - a busy core costs the same whatever it does: AVX-heavy GEMM and a spin-waiting
      thread both count at `watts_per_core`; frequency scaling, turbo and SMT (two hardware
      threads counted as two cores) are ignored;
    - `watts_per_core` is a guess (package TDP / cores is the usual rule of thumb: 10–20 W);
      on a VM, time stolen by the hypervisor is invisible.
    So its joules compare plans on the same machine (relative), not absolute energy.
    """

    source = "estimated"

    def __init__(self, watts_per_core: float = 15.0, idle_watts: float = 0.0, *,
                 cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.monotonic):
        if not watts_per_core >= 0 or not idle_watts >= 0:
            raise InvalidArgument(
                f"watts must be non-negative: watts_per_core={watts_per_core}, idle_watts={idle_watts}")
        self.watts_per_core = float(watts_per_core)
        self.idle_watts = float(idle_watts)
        self._cpu, self._wall = cpu_clock, wall_clock
        self._cpu0, self._wall0 = cpu_clock(), wall_clock()
        self._lock = threading.Lock()
        self._last_j = 0.0

    def energy_j(self) -> float:
        with self._lock:
            j = ((self._cpu() - self._cpu0) * self.watts_per_core
                 + (self._wall() - self._wall0) * self.idle_watts)
            self._last_j = max(self._last_j, j)  # clocks are monotonic; this keeps the promise anyway
            return self._last_j


def default_meter(prefer: str = "auto", *, watts_per_core: float = 15.0, idle_watts: float = 0.0,
                  rapl_root: str | os.PathLike = RAPL_ROOT, gpu_index: int = 0) -> PowerMeter:
    """The best meter this machine offers.

    prefer: "auto" (RAPL when readable, else the estimator), or one source by name
    ("rapl", "nvml", "estimated"), which raises MeterUnavailable when it cannot be read.
    """
    if prefer == "auto":
        if RaplMeter.available(rapl_root):
            return RaplMeter(rapl_root)
        return CpuTimeEstimator(watts_per_core, idle_watts)
    if prefer == "rapl":
        return RaplMeter(rapl_root)
    if prefer == "nvml":
        return NvmlMeter(gpu_index)
    if prefer == "estimated":
        return CpuTimeEstimator(watts_per_core, idle_watts)
    raise InvalidArgument(f"unknown power source {prefer!r}; expected 'auto' or one of {SOURCES}", field="prefer")


# ---------------------------------------------------------------------------------------------
# Rolling power and per-request attribution


class PowerWindow:
    """Rolling-average power from (time, joules) samples of a meter.

    Call `sample()` on each engine step or from a timer; `watts()` is the average over the
    last `window_s` seconds: (J_last − J_first) / (t_last − t_first), where the first sample
    is the newest one at or before the window's start, so the average spans the whole window.
    Samples are kept for `retain_s` (≥ window_s) so `joules_between` can look back.
    """

    def __init__(self, meter: PowerMeter, window_s: float = 5.0, *,
                 retain_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise InvalidArgument(f"window_s must be positive, got {window_s}", field="window_s")
        self.meter = meter
        self.window_s = float(window_s)
        self.retain_s = max(self.window_s, float(retain_s) if retain_s is not None else 60.0)
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        return self.meter.source

    def sample(self) -> tuple[float, float]:
        """Read the meter now; returns (time, cumulative joules)."""
        with self._lock:
            s = (self._clock(), self.meter.energy_j())
            self._samples.append(s)
            # Drop samples older than retain_s, keeping one at or before the horizon.
            horizon = s[0] - self.retain_s
            while len(self._samples) >= 2 and self._samples[1][0] <= horizon:
                self._samples.popleft()
            return s

    def watts(self) -> float:
        """Average watts over the window; 0.0 until two samples span some time."""
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            t1, j1 = self._samples[-1]
            start = t1 - self.window_s
            first = self._samples[0]
            for s in reversed(self._samples):
                if s[0] <= start:
                    first = s
                    break
            t0, j0 = first
            return (j1 - j0) / (t1 - t0) if t1 > t0 else 0.0

    def joules_between(self, t0: float, t1: float) -> float:
        """Joules consumed between two clock times, interpolating linearly between samples.

        Both times must lie within the retained samples (InvalidArgument otherwise).
        """
        if t1 < t0:
            raise InvalidArgument(f"joules_between: t1={t1} is before t0={t0}")
        with self._lock:
            samples = list(self._samples)
        if not samples or t0 < samples[0][0] or t1 > samples[-1][0]:
            span = f"[{samples[0][0]}, {samples[-1][0]}]" if samples else "nothing"
            raise InvalidArgument(f"joules_between({t0}, {t1}): samples cover {span}")
        return _interpolate(samples, t1) - _interpolate(samples, t0)


def _interpolate(samples: list[tuple[float, float]], t: float) -> float:
    for (ta, ja), (tb, jb) in pairwise(samples):
        if ta <= t <= tb:
            return ja if tb == ta else ja + (jb - ja) * (t - ta) / (tb - ta)
    return samples[-1][1]  # single sample, t equal to it


class EnergyAccount:
    """Per-request joules: each step's energy split over its sequences by token share.

    request joules = Σ over the steps it took part in of step_joules × its tokens / step tokens,
    where a sequence's tokens in a step are its prefill-chunk length or 1 for a decode.
    Energy spent outside steps (idle, between steps) belongs to no request and is counted in
    `unattributed_j`. Token share is an approximation: a prefill token and a decode token
    cost about the same FLOPs in the linear layers, but attention cost grows with context.

        with account.step({"req-1": 128, "req-2": 1}):   # reads the meter around the step
            run_forward(...)
        joules = account.pop("req-1")                     # when the request finishes
    """

    def __init__(self, meter: PowerMeter):
        self.meter = meter
        self._lock = threading.Lock()
        self._joules: dict[str, float] = {}
        self._attributed_j = 0.0
        self._start_j = meter.energy_j()

    @property
    def source(self) -> str:
        return self.meter.source

    @contextmanager
    def step(self, tokens: Mapping[str, int]) -> Iterator[None]:
        """Meter one engine step and attribute its joules (also when the step raises)."""
        j0 = self.meter.energy_j()
        try:
            yield
        finally:
            self.record_step(self.meter.energy_j() - j0, tokens)

    def record_step(self, joules: float, tokens: Mapping[str, int]) -> None:
        """Attribute `joules` measured elsewhere to the sequences of one step."""
        if joules < 0:
            raise InvalidArgument(f"step joules must be non-negative, got {joules}")
        if any(n < 0 for n in tokens.values()):
            raise InvalidArgument(f"token counts must be non-negative: {dict(tokens)}")
        total = sum(tokens.values())
        if total == 0:
            return
        with self._lock:
            for seq, n in tokens.items():
                if n:
                    self._joules[seq] = self._joules.get(seq, 0.0) + joules * n / total
            self._attributed_j += joules

    def joules(self, seq: str) -> float:
        """Joules attributed to a sequence so far (0.0 if it has taken no step)."""
        with self._lock:
            return self._joules.get(seq, 0.0)

    def pop(self, seq: str) -> float:
        """The sequence's joules, forgetting it (call once the request has finished)."""
        with self._lock:
            return self._joules.pop(seq, 0.0)

    @property
    def attributed_j(self) -> float:
        with self._lock:
            return self._attributed_j

    @property
    def unattributed_j(self) -> float:
        """Meter joules since this account was created that no step claimed."""
        total = self.meter.energy_j() - self._start_j
        return max(0.0, total - self.attributed_j)
