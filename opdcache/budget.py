"""Dynamic response budget (paper §3.3, Algorithm 1, lines 12-19), persisted in RUN/budget.json.

Released-code semantics: a response *hits* when E >= max(M_min, M_t - margin); with hit ratio
h_t = mean(hit), the budget grows by Delta (capped at M_max) when h_t >= rho, and shrinks by Delta
(floored at M_min) after ``patience`` consecutive rounds with h_t < rho, the miss counter being
reset by every change. The state file holds the config, the budget for the next round and every
decision, so a new process continues where the last one stopped and a round is never decided
twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opdcache.errors import CacheFormatError, OpdcacheError
from opdcache.fields import fail, setting, validate
from opdcache.rundir import RunDir, atomic_write_json


@dataclass(frozen=True)
class BudgetConfig:
    """Algorithm 1 hyper-parameters (paper App. A.9 defaults)."""

    initial: int = setting(1024, "M_1, the first round's budget (the paper: 6144 for its high pair)", gt=0)
    min: int = setting(1024, "M_min", gt=0)
    max: int = setting(12288, "M_max", gt=0)
    step: int = setting(100, "Delta: budget change per decision", ge=0)
    margin: int = setting(100, "m: a response hits when E >= max(M_min, M_t - m)", ge=0)
    rho: float = setting(0.1, "hit-ratio threshold for expanding", ge=0, le=1)
    patience: int = setting(3, "P: low-hit rounds in a row before shrinking", ge=1)

    def __post_init__(self) -> None:
        validate(self, "budget")
        if self.min > self.max:
            fail("budget", "min", f"min <= max ({self.max})", self.min)
        if not self.min <= self.initial <= self.max:
            fail(
                "budget", "initial", f"min <= initial <= max ({self.min} <= ... <= {self.max})", self.initial
            )


@dataclass(frozen=True)
class Decision:
    round: int
    max_tokens: int  # M_t the round was sampled under
    boundary: int  # max(M_min, M_t - margin)
    hit_ratio: float
    effective_len_mean: float
    effective_len_min: int
    effective_len_max: int
    responses: int
    low_hits: int  # consecutive low-hit rounds after this decision
    next_max_tokens: int  # M_{t+1}
    action: str  # "expand", "shrink" or "keep"


def decide(cfg: BudgetConfig, r: int, m_t: int, low_hits: int, effective_len: np.ndarray) -> Decision:
    """One controller step (Alg. 1 lines 12-19) from the round's effective lengths (eq. 12)."""
    e = np.asarray(effective_len)
    if e.size == 0:
        raise OpdcacheError(f"budget: round {r} has no responses to decide on")
    boundary = max(cfg.min, m_t - cfg.margin)
    h = float(np.mean(e >= boundary))
    if h >= cfg.rho:
        nxt, low, action = min(m_t + cfg.step, cfg.max), 0, "expand"
    elif low_hits + 1 >= cfg.patience:
        nxt, low, action = max(m_t - cfg.step, cfg.min), 0, "shrink"
    else:
        nxt, low, action = m_t, low_hits + 1, "keep"
    return Decision(
        round=r,
        max_tokens=m_t,
        boundary=boundary,
        hit_ratio=h,
        effective_len_mean=float(e.mean()),
        effective_len_min=int(e.min()),
        effective_len_max=int(e.max()),
        responses=int(e.size),
        low_hits=low,
        next_max_tokens=nxt,
        action=action,
    )


@dataclass
class BudgetState:
    config: BudgetConfig
    next_round: int = 0
    max_tokens: int = 0  # budget for ``next_round``
    low_hits: int = 0
    history: list[Decision] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "next_round": self.next_round,
            "max_tokens": self.max_tokens,
            "low_hits": self.low_hits,
            "history": [asdict(d) for d in self.history],
        }


class BudgetController:
    """Algorithm 1's budget state for one run directory."""

    def __init__(self, run: RunDir | str | Path, config: BudgetConfig | None = None):
        self.path = RunDir.of(run).budget
        if self.path.exists():
            self.state = self._load()
            if config is not None and config != self.state.config:
                raise OpdcacheError(
                    f"{self.path}: the run's budget config {asdict(self.state.config)} differs from "
                    f"{asdict(config)}; budget settings cannot change mid-run"
                )
        else:
            cfg = config or BudgetConfig()
            self.state = BudgetState(cfg, max_tokens=cfg.initial)

    def _load(self) -> BudgetState:
        try:
            raw = json.loads(self.path.read_text())
            state = BudgetState(
                BudgetConfig(**raw["config"]),
                raw["next_round"],
                raw["max_tokens"],
                raw["low_hits"],
                [Decision(**d) for d in raw["history"]],
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheFormatError(f"{self.path}: unreadable budget state ({e})") from e
        return state

    def max_tokens_for(self, r: int) -> int:
        """M_r: the budget round ``r`` is (or was) sampled under."""
        for d in self.state.history:
            if d.round == r:
                return d.max_tokens
        if r != self.state.next_round:
            raise OpdcacheError(
                f"budget: round {r} is not decided and is not the next round ({self.state.next_round})"
            )
        return self.state.max_tokens

    def update(self, r: int, effective_len: np.ndarray) -> Decision:
        """Record round ``r``'s decision; repeating a decided round returns the stored decision."""
        for d in self.state.history:
            if d.round == r:
                return d
        if r != self.state.next_round:
            raise OpdcacheError(f"budget: next round to decide is {self.state.next_round}, got {r}")
        s = self.state
        d = decide(s.config, r, s.max_tokens, s.low_hits, effective_len)
        s.history.append(d)
        s.next_round, s.max_tokens, s.low_hits = r + 1, d.next_max_tokens, d.low_hits
        self.save()
        return d

    def save(self) -> None:
        atomic_write_json(self.path, self.state.to_json())
