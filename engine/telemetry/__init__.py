"""Telemetry: power meters, per-request energy attribution, and serving metrics."""

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
from engine.telemetry.metrics import PlanLabels, ServingMetrics

__all__ = [
    "CpuTimeEstimator",
    "EnergyAccount",
    "MeterUnavailable",
    "NvmlMeter",
    "PlanLabels",
    "PowerMeter",
    "PowerWindow",
    "RaplMeter",
    "ServingMetrics",
    "default_meter",
]
