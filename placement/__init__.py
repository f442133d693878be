"""Hardware profile, cost model and planner: where each weight lives and how fast that runs."""

from placement.cost import (
    CostInputs,
    Rates,
    StepTime,
    decode_step_time,
    expected_unique_experts,
    prefill_time,
)
from placement.hardware import GpuInfo, HardwareProfile, NumaNode, detect, save_profile
from placement.inventory import KINDS, Inventory, Tensor
from placement.planner import Plan, PlanError, PlanOptions, make_plan
from placement.report import format_plan
from placement.units import parse_rate, parse_size

__all__ = [
    "KINDS",
    "CostInputs",
    "GpuInfo",
    "HardwareProfile",
    "Inventory",
    "NumaNode",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Rates",
    "StepTime",
    "Tensor",
    "decode_step_time",
    "detect",
    "expected_unique_experts",
    "format_plan",
    "make_plan",
    "parse_rate",
    "parse_size",
    "prefill_time",
    "save_profile",
]
