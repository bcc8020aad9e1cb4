"""A reliability setting ("variant"): which bad-event metric and which eq. 7-12 parameters.

Metrics:
  overlap  Prune-OPD default: B = [O < gamma] (eqs. 6-7).
  top_p    App. A.10: B = [y not in the teacher's visible top-p nucleus].
  none     plain OPD control: no bad events, R = L = 1 on every valid position (overlap kept
           as a diagnostic).
  random   control arm: positions kept (R = 1) or pruned (R = 0, L = w_base) uniformly at random,
           independent of compatibility, so that per round the kept token fraction (match=fraction)
           or kept |OPD reward| mass (match=mass) equals that of the ``reference`` variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from opdcache.errors import ConfigError

Metric = Literal["overlap", "top_p", "none", "random"]


@dataclass(frozen=True)
class VariantSpec:
    """Parameters of one scoring variant (paper defaults)."""

    metric: Metric = "overlap"
    gamma: float = 0.7  # eq. 7 compatibility threshold
    top_p: float = 0.95  # App. A.10 nucleus mass p
    w_drop: float = 0.01  # eq. 9 penalty per bad event
    w_base: float = 0.5  # eq. 10 base weight floor
    eps: float = 1e-8  # eq. 12 tolerance
    reference: str | None = None  # random: the variant whose retention is matched
    match: Literal["fraction", "mass"] = "fraction"  # random: what is matched
    seed: int = 0  # random: permutation seed (combined with the round)

    def __post_init__(self) -> None:
        checks = [
            (
                self.metric in ("overlap", "top_p", "none", "random"),
                "metric must be overlap, top_p, none or random",
            ),
            (0.0 <= self.gamma <= 1.0, "gamma must be in [0, 1]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.w_drop >= 0.0, "w_drop must be >= 0"),
            (self.w_base >= 0.0, "w_base must be >= 0"),
            (0.0 <= self.eps < 1.0, "eps must be in [0, 1)"),
            (self.match in ("fraction", "mass"), "match must be fraction or mass"),
            (
                self.metric != "random" or bool(self.reference),
                "metric random needs a reference variant",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"variant: {msg} (got {self})")

    def to_meta(self) -> dict[str, Any]:
        """Parameters stored under ``opdcache.variant`` in every score file (keys that matter)."""
        keep = {
            "overlap": ("gamma", "w_drop", "w_base", "eps"),
            "top_p": ("top_p", "w_drop", "w_base", "eps"),
            "none": ("eps",),
            "random": ("w_base", "eps", "reference", "match", "seed"),
        }[self.metric]
        return {"metric": self.metric, **{k: getattr(self, k) for k in keep}}

    def replace(self, **changes: Any) -> VariantSpec:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
