"""A reliability setting ("variant"): which bad-event metric and which eq. 7-12 parameters.

Metrics:
  overlap  Prune-OPD default: B = [O < gamma] (eqs. 6-7).
  top_p    App. A.10: B = [y not in the teacher's visible top-p nucleus].
  none     plain OPD control: no bad events, R = L = 1 on every valid position (overlap kept
           as a diagnostic).
  iw       IW-OPD (TRL; arXiv 2606.22600): no bad events (R = 1), L = 1 + iw_gamma (1 - S_<tau / S) with
           S the response's accumulated |log q - log p| at the sampled tokens (reliability.iw_opd_weights).
  random   control arm: positions kept (R = 1) or pruned (R = 0, L = w_base) uniformly at random,
           independent of compatibility, so that per round the kept token fraction (match=fraction)
           or kept |OPD reward| mass (match=mass) equals that of the ``reference`` variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from opdcache.fields import fail, setting, validate

Metric = Literal["overlap", "top_p", "none", "random", "iw"]


@dataclass(frozen=True)
class VariantSpec:
    """Parameters of one scoring variant (paper defaults)."""

    metric: Metric = setting(
        "overlap", "bad-event metric: overlap (eq. 7), top_p (App. A.10), none, random, iw (IW-OPD's weights)"
    )
    gamma: float = setting(0.7, "eq. 7 compatibility threshold: bad when overlap O < gamma", ge=0, le=1)
    top_p: float = setting(0.95, "App. A.10 nucleus mass p", gt=0, le=1)
    w_drop: float = setting(0.01, "eq. 9 penalty per bad event", ge=0)
    w_base: float = setting(0.5, "eq. 10 base weight on every valid position", ge=0)
    iw_gamma: float = setting(0.5, "metric iw: weight amplification (TRL's iw_opd_gamma)", ge=0)
    eps: float = setting(1e-8, "eq. 12 tolerance: E counts positions with R > eps", ge=0, lt=1)
    reference: str | None = setting(None, "random: the variant whose retention is matched")
    match: Literal["fraction", "mass"] = setting(
        "fraction", "random: match kept token fraction or |reward| mass"
    )
    seed: int = setting(0, "random: permutation seed (combined with the round)")
    outcome: Literal["", "math", "exact", "last-number", "chain"] = setting(
        "",
        "outcome reward per response (columns outcome, grpo_advantage): checker of the decoded response"
        " against the prompt's gold answer; empty = none (arms prune-grpo and grpo set it to eval.checker)",
    )
    grpo_std_norm: bool = setting(
        True,
        "GRPO advantage (o - mean) / (std + grpo_eps) over a prompt's samples; false: o - mean (Dr. GRPO)",
    )
    grpo_eps: float = setting(1e-6, "GRPO advantage epsilon (verl's 1e-6; TRL uses 1e-4)", gt=0)

    def __post_init__(self) -> None:
        validate(self, "score")
        if self.metric == "random" and not self.reference:
            fail("score", "reference", "a reference variant for metric random", self.reference)

    def to_meta(self) -> dict[str, Any]:
        """Parameters stored under ``opdcache.variant`` in every score file (keys that matter)."""
        keep = {
            "overlap": ("gamma", "w_drop", "w_base", "eps"),
            "top_p": ("top_p", "w_drop", "w_base", "eps"),
            "none": ("eps",),
            "iw": ("iw_gamma", "eps"),
            "random": ("w_base", "eps", "reference", "match", "seed"),
        }[self.metric]
        if self.outcome:  # absent otherwise, so variants scored before outcomes existed still match
            keep = (*keep, "outcome", "grpo_std_norm", "grpo_eps")
        return {"metric": self.metric, **{k: getattr(self, k) for k in keep}}

    def replace(self, **changes: Any) -> VariantSpec:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
