"""Where the bytes go (size), whether they fit with the code (budget), what drives them (rms),
and a byte-budget plan optimizer (optimize)."""

from .budget import BudgetReport, budget_report, code_cost
from .optimize import (
    Measurements, OptimizeDetails, default_candidates, measure_candidates, optimize_plan, plan_for_budget,
    recipe_to_toml, save_recipe,
)
from .rms import RmsReport, linear_fit, plot_rms, rms_analysis, rms_recipe
from .size import SizeReport, analyze_size, attribute_stream_bytes, load_or_pack, size_report, zeroth_order_entropy

__all__ = [
    "BudgetReport", "budget_report", "code_cost",
    "Measurements", "OptimizeDetails", "default_candidates", "measure_candidates", "optimize_plan",
    "plan_for_budget", "recipe_to_toml", "save_recipe",
    "RmsReport", "linear_fit", "plot_rms", "rms_analysis", "rms_recipe",
    "SizeReport", "analyze_size", "attribute_stream_bytes", "load_or_pack", "size_report", "zeroth_order_entropy",
]
