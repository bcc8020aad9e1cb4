"""One round's stages, wired once: what ``opdcache run`` (loop.run_round) and the stage commands
(``opdcache rollout | teacher | train | budget``) both call.

A :class:`RoundContext` is built once per round: the config, the arm's plan (which variants it scores,
trains and budgets by), the budget controller and the round's student checkpoint, resolved once and
handed to every stage; each step records its wall time in RUN/stage_times.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from opdcache.arms import ArmPlan, plan
from opdcache.budget import BudgetController, Decision
from opdcache.config import RunConfig
from opdcache.models.checkpoint import student_checkpoint
from opdcache.results import RolloutResult, TeacherResult, TrainResult
from opdcache.rundir import RunDir
from opdcache.shard import WHOLE, Shard
from opdcache.stagetimes import timed

if TYPE_CHECKING:
    from opdcache.rollout.engine import PersistentEngine
    from opdcache.teacher.stage import ResidentTeacher
    from opdcache.train.stage import ResidentTrainer


@dataclass
class RoundContext:
    """Round ``r`` of ``run``: what its stages share. ``engines``, ``teacher`` and ``trainer`` are kept
    across rounds by ``opdcache run``; a stage command leaves them None (each stage loads its own)."""

    run: RunDir
    r: int
    cfg: RunConfig
    progress: bool = True
    shard: Shard = WHOLE
    engines: PersistentEngine | None = None
    teacher: ResidentTeacher | None = None
    trainer: ResidentTrainer | None = None
    plan: ArmPlan = field(init=False)

    def __post_init__(self) -> None:
        self.plan = plan(self.cfg)

    @cached_property
    def budget(self) -> BudgetController:
        """RUN/budget.json under the arm's budget settings; read only by the steps that use it (rollout,
        budget), so the teacher and train commands never touch it."""
        return BudgetController(self.run, self.plan.budget)

    @cached_property
    def student(self) -> str:
        """The checkpoint round r rolls out, scores against the teacher and trains from."""
        return student_checkpoint(self.run, self.cfg, self.r)


def rollout_step(ctx: RoundContext) -> RolloutResult:
    """Round r's rollouts at the budget M_r the controller decided."""
    from opdcache.rollout.stage import rollout_round

    m_t = ctx.budget.max_tokens_for(ctx.r)
    return timed(ctx.run, ctx.r, "rollout", lambda: rollout_round(
        ctx.run, ctx.r, ctx.cfg, m_t, ctx.progress, ctx.engines, ctx.teacher, ctx.shard, student=lambda: ctx.student,
        arm=ctx.plan,
    ), shard=ctx.shard)  # fmt: skip


def teacher_step(ctx: RoundContext) -> TeacherResult:
    from opdcache.teacher.stage import teacher_round

    return timed(ctx.run, ctx.r, "teacher", lambda: teacher_round(
        ctx.run, ctx.r, ctx.cfg, ctx.progress, ctx.teacher, ctx.shard, student=lambda: ctx.student,
    ), shard=ctx.shard)  # fmt: skip


def train_step(ctx: RoundContext, variant: str | None = None) -> TrainResult:
    """Train round r's student on its cache weighted by ``variant``'s L (default: the arm's)."""
    from opdcache.train.stage import train_round

    v = variant or ctx.plan.train_variant
    return timed(ctx.run, ctx.r, "train", lambda: train_round(
        ctx.run, ctx.r, ctx.cfg, v, ctx.progress, ctx.trainer, student=lambda: ctx.student, arm=ctx.plan,
    ))  # fmt: skip


def budget_step(ctx: RoundContext, variant: str | None = None) -> Decision:
    """Decide M_{r+1} from round r's effective lengths under ``variant`` (default: the arm's)."""
    from opdcache.score.stage import read_effective_lengths

    v = variant or ctx.plan.budget_variant
    return timed(
        ctx.run, ctx.r, "budget", lambda: ctx.budget.update(ctx.r, read_effective_lengths(ctx.run, v, ctx.r))
    )
