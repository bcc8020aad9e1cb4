"""Comparison arms (paper §4.1): which variants a round scores, trains on, and budgets by."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from opdcache.budget import BudgetConfig
from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.variant import VariantSpec


@dataclass(frozen=True)
class ArmPlan:
    variants: list[tuple[str, VariantSpec]]  # scored every round, in order
    train_variant: str  # whose L scales the rewards
    budget_variant: str  # whose E drives Alg. 1
    budget: BudgetConfig
    inflight: bool = False  # samples stop generating once R reaches 0 (rollout/inflight.py)
    # which loss terms train where: opd (the OPD objective x L, train.objective), gated (OPD x L where
    # R > 0, GRPO where R = 0), sum (OPD x L and GRPO everywhere, the peers' form), grpo (GRPO everywhere)
    terms: Literal["opd", "gated", "sum", "grpo"] = "opd"


def plan(cfg: RunConfig) -> ArmPlan:
    arm, name, spec = cfg.arm, cfg.score.variant, cfg.score.spec
    if arm.name == "prune":
        return ArmPlan([(name, spec)], name, name, cfg.budget)
    if arm.name == "prune-grpo":  # issue 24: Prune-OPD's variant with the outcome reward; its E budgets
        graded = spec.replace(outcome=spec.outcome or cfg.eval.checker)
        terms = "gated" if cfg.train.grpo_mode == "switch" else "sum"
        return ArmPlan([(name, graded)], name, name, cfg.budget, terms=terms)
    if arm.name == "grpo":  # the RL-only control: outcome loss everywhere, fixed budget like OPD
        fixed = dataclasses.replace(cfg.budget, initial=cfg.budget.max, min=cfg.budget.max)
        graded = VariantSpec(metric="none", outcome=spec.outcome or cfg.eval.checker,
                             grpo_std_norm=spec.grpo_std_norm, grpo_eps=spec.grpo_eps)  # fmt: skip
        return ArmPlan([("grpo", graded)], "grpo", "grpo", fixed, terms="grpo")
    if arm.name == "prune-inflight":
        if spec.metric not in ("overlap", "top_p"):
            raise OpdcacheError(
                f"arm.name prune-inflight: score.metric must be overlap or top_p (bad events the rollout can "
                f"count in flight), got {spec.metric!r}"
            )
        return ArmPlan([(name, spec)], name, name, cfg.budget, inflight=True)
    if arm.name == "iw-opd":  # TRL's IW-OPD weights at OPD's fixed budget (issue 40's peer arm)
        fixed = dataclasses.replace(cfg.budget, initial=cfg.budget.max, min=cfg.budget.max)
        return ArmPlan([("iw", VariantSpec(metric="iw", iw_gamma=spec.iw_gamma))], "iw", "iw", fixed)
    if arm.name in ("opd", "truncate"):
        m = cfg.budget.max if arm.name == "opd" else arm.truncate_tokens
        fixed = dataclasses.replace(cfg.budget, initial=m, min=m, max=m)
        return ArmPlan([("opd", VariantSpec(metric="none"))], "opd", "opd", fixed)
    rnd = VariantSpec(
        metric="random", reference=name, match=arm.random_match, w_base=spec.w_base, seed=cfg.rollout.seed
    )
    return ArmPlan([(name, spec), ("random", rnd)], "random", name, cfg.budget)
