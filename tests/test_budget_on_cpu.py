"""Algorithm 1 (released-code semantics) by hand, against a plain re-statement, and across processes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opdcache.budget import BudgetConfig, BudgetController, decide
from opdcache.errors import ConfigError, OpdcacheError

CFG = BudgetConfig(initial=1024, min=1024, max=1224, step=100, margin=100, rho=0.1, patience=3)


def test_boundary_is_max_of_min_and_budget_minus_margin():
    d = decide(CFG, 0, 1024, 0, np.array([1000] * 10))  # 1000 < max(1024, 924)
    assert d.boundary == 1024 and d.hit_ratio == 0.0 and d.action == "keep"
    d = decide(CFG, 0, 1124, 0, np.array([1024] * 10))  # boundary max(1024, 1024)
    assert d.boundary == 1024 and d.hit_ratio == 1.0


def test_expand_caps_at_max_and_resets_counter():
    e = np.array([1100] * 1 + [10] * 9)  # h = 0.1 >= rho
    d = decide(CFG, 3, 1124, 2, e)
    assert (d.action, d.next_max_tokens, d.low_hits) == ("expand", 1224, 0)
    assert decide(CFG, 4, 1224, 0, np.array([2000])).next_max_tokens == 1224


def test_shrink_after_patience_consecutive_misses_and_floor():
    e = np.array([5] * 10)
    d1 = decide(CFG, 0, 1224, 0, e)
    d2 = decide(CFG, 1, 1224, d1.low_hits, e)
    d3 = decide(CFG, 2, 1224, d2.low_hits, e)
    assert [d.action for d in (d1, d2, d3)] == ["keep", "keep", "shrink"]
    assert d3.next_max_tokens == 1124 and d3.low_hits == 0
    assert decide(CFG, 0, 1024, 2, e).next_max_tokens == 1024  # floored at M_min


def _alg1(cfg, es):
    """Algorithm 1 lines 12-19, written out plainly."""
    m, low, out = cfg.initial, 0, []
    for e in es:
        h = sum(x >= max(cfg.min, m - cfg.margin) for x in e) / len(e)
        if h >= cfg.rho:
            m, low = min(m + cfg.step, cfg.max), 0
        else:
            low += 1
            if low >= cfg.patience:
                m, low = max(m - cfg.step, cfg.min), 0
        out.append(m)
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3000), min_size=1, max_size=12), min_size=1, max_size=25),
    st.integers(256, 1024),
    st.integers(1, 4),
    st.integers(0, 300),
    st.floats(0.05, 0.9),
)
def test_controller_matches_algorithm_and_stays_in_bounds(tmp_path_factory, es, mmin, patience, step, rho):
    cfg = BudgetConfig(
        initial=mmin + 2 * step,
        min=mmin,
        max=mmin + 10 * step,
        step=step,
        margin=100,
        rho=rho,
        patience=patience,
    )
    ctl = BudgetController(tmp_path_factory.mktemp("run"), cfg)
    got = [ctl.update(r, np.array(e)).next_max_tokens for r, e in enumerate(es)]
    assert got == _alg1(cfg, es)
    assert all(cfg.min <= m <= cfg.max for m in got)


def test_state_persists_and_rounds_are_decided_once(tmp_path):
    ctl = BudgetController(tmp_path, CFG)
    d0 = ctl.update(0, np.array([2000] * 5))
    assert ctl.max_tokens_for(1) == 1124
    again = BudgetController(tmp_path)  # a new process
    assert again.state.next_round == 1 and again.max_tokens_for(1) == 1124
    assert again.update(0, np.array([0] * 5)) == d0  # repeating a decided round changes nothing
    assert again.state.next_round == 1
    with pytest.raises(OpdcacheError, match="next round to decide is 1, got 3"):
        again.update(3, np.array([1]))
    with pytest.raises(OpdcacheError, match="cannot change mid-run"):
        BudgetController(tmp_path, BudgetConfig())
    assert again.max_tokens_for(0) == 1024


def test_bad_state_file_and_config(tmp_path):
    (tmp_path / "budget.json").write_text("{not json")
    with pytest.raises(OpdcacheError, match="budget.json: unreadable budget state"):
        BudgetController(tmp_path)
    with pytest.raises(ConfigError, match="min <= initial <= max"):
        BudgetConfig(initial=100)
    with pytest.raises(OpdcacheError, match="no responses"):
        decide(CFG, 0, 1024, 0, np.array([]))


def test_a_round_context_reads_the_budget_only_for_the_steps_that_use_it(tmp_path):
    """The teacher and train commands build a RoundContext too: a budget.json they never use must not
    stop them; the rollout and budget steps, which do, name the file."""
    from opdcache.config import RunConfig
    from opdcache.rundir import RunDir
    from opdcache.stages import RoundContext

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.budget.write_text("{not json")
    ctx = RoundContext(run, 0, RunConfig())
    assert ctx.plan.train_variant  # the plan needs only the config
    with pytest.raises(OpdcacheError, match="budget.json: unreadable budget state"):
        ctx.budget.max_tokens_for(0)
