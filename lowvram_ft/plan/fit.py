"""The fit check before a GPU run (`decide_fit`): the estimate on the card, what train.fit=auto changes
to make it fit without changing the trained model, and whether the run goes ahead."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from .calibration import basis_text, stated_error
from .estimate import predict
from .inputs import PlanError, config_precision, plan_input_from_config
from .model_configs import model_config_for
from .precision import Precision
from .recommendations import budget_gib, recommend, same_model_change, undo_overrides
from .report import format_breakdown, format_recommendations

@dataclass(frozen=True)
class FitDecision:
    """What the fit check decided before a GPU run (`decide_fit`).

    action: "fits" | "adjusted" (train.fit=auto changed settings that keep the trained model the same,
    and it now fits) | "warn" (does not fit as estimated; the run goes ahead) | "refuse" (a calibrated
    estimate over the card by more than its measured error)."""

    action: str
    peak_gib: float                  # as it will run (after train.fit=auto's changes)
    vram_gib: float
    basis: str                       # "calibrated estimate, ±12% measured on 11 published cases"
    precision: Precision
    configured_gib: float | None = None  # as configured, when train.fit=auto changed something
    overrides: tuple[str, ...] = ()  # applied by train.fit=auto
    undo: tuple[str, ...] = ()       # the overrides that restore what was configured
    report: str = ""                 # breakdown and recommendations, for a run that does not fit

    def lines(self) -> list[str]:
        """The log lines: the verdict, then each change and how to undo it."""
        before = f"{self.configured_gib:.2f} GiB as configured, " if self.overrides else ""
        head = (f"estimated peak {before}{self.peak_gib:.2f} GiB{' with the changes below' if before else ''} "
                f"({self.basis}) on a {self.vram_gib:.2f} GiB card, {self.precision.why}: ")
        head += {"fits": "fits", "adjusted": "fits (the changes keep the trained model the same)",
                 "warn": "may not fit — training anyway (the estimate is not a measurement)",
                 "refuse": "does not fit"}[self.action]
        changes = [f"train.fit=auto set {o} (undo: {u}, or train.fit=warn)" for o, u in zip(self.overrides, self.undo)]
        return [head, *changes]


def decide_fit(cfg, vram_gib: float, bf16: bool = True, model_config: Mapping | None = None) -> FitDecision | None:
    """The fit check of a run about to start on a GPU of `vram_gib` (train.fit decides what happens when
    the estimate is over the card). None when train.fit=off or the model's config.json is unknown.

    An estimate never blocks a run unless it is calibrated and over the card by more than its measured
    error. train.fit=auto applies the planner's changes that keep the trained model the same (embedding
    offload, checkpointing mode, micro-batch -> accumulation at the same effective batch); rank,
    targets and sequence length are never changed."""
    if cfg.train.fit == "off":
        return None
    try:
        inp = plan_input_from_config(cfg, model_config or model_config_for(cfg.model.name), bf16)
        breakdown = predict(inp, vram_gib)
    except PlanError:
        return None
    budget = budget_gib(vram_gib)
    calibrated, error, _ = stated_error()
    basis = basis_text()
    decision = FitDecision("fits", breakdown.total_gib, vram_gib, basis, config_precision(cfg, inp.model_config, bf16))
    if breakdown.total_gib <= budget:
        return decision
    peak, overrides, undo = breakdown.total_gib, (), ()
    if cfg.train.fit == "auto":
        change = same_model_change(inp, vram_gib, budget)
        if change is not None and change.peak_gib < peak:
            peak, overrides = change.peak_gib, change.overrides
            undo = undo_overrides(inp, change)
    report = "\n".join([format_breakdown(breakdown, vram_gib), format_recommendations(recommend(inp, vram_gib), vram_gib)])
    if peak <= budget:
        action = "adjusted"
    elif calibrated and peak > vram_gib * (1 + error):
        action = "refuse"
    else:
        action = "warn"
    return replace(decision, action=action, peak_gib=peak, configured_gib=breakdown.total_gib, overrides=overrides,
                   undo=undo, report=report)
