"""Eqs. 6-12 and App. A.10 on hand-worked cases, against naive references, and as properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opdcache.score import reliability as rl
from opdcache.score.torch_reference import prune_opd_weights


def test_overlap_hand_worked():
    s = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    t = np.array([[4, 3, 9, 8], [5, 6, 7, 8], [10, 11, 12, 13]])
    np.testing.assert_array_equal(rl.topk_overlap(s, t), [0.5, 1.0, 0.0])


def test_overlap_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        rl.topk_overlap(np.zeros((3, 4), int), np.zeros((3, 5), int))
    with pytest.raises(ValueError, match="integer"):
        rl.topk_overlap(np.zeros((3, 4)), np.zeros((3, 4)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_overlap_matches_set_intersection(n, k, seed):
    rng = np.random.default_rng(seed)
    vocab = max(k, 3 * k // 2)  # small vocabulary: many shared ids
    s = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    t = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    want = [len(set(a) & set(b)) / k for a, b in zip(s.tolist(), t.tolist(), strict=True)]
    np.testing.assert_allclose(rl.topk_overlap(s, t), want, rtol=0, atol=1e-7)


def test_bad_event_is_strictly_below_gamma():
    o = np.array([11 / 16, 0.7, 12 / 16, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(rl.overlap_bad_events(o, 0.7), [True, False, False, True])
    np.testing.assert_array_equal(rl.overlap_bad_events(o, 0.75), [True, True, False, True])


def test_cumulative_reliability_weight_effective_length_hand_worked():
    bad = np.array([0, 1, 1, 0, 1, 0, 0], dtype=bool)
    offsets = np.array([0, 4, 4, 7])  # second response is empty
    c = rl.cumulative_bad(bad, offsets)
    np.testing.assert_array_equal(c, [0, 1, 2, 2, 1, 1, 1])  # inclusive of tau, restarts per response
    r = rl.reliability(c, 0.5)
    np.testing.assert_allclose(r, [1.0, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(rl.loss_weight(r, 0.5), [1.5, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(rl.effective_length(r, offsets), [2, 0, 3])


def test_reliability_clips_to_unit_interval():
    np.testing.assert_allclose(
        rl.reliability(np.array([0, 50, 100, 101, 250]), 0.01), [1.0, 0.5, 0.0, 0.0, 0.0]
    )
    np.testing.assert_allclose(rl.reliability(np.array([3]), 0.0), [1.0])


def test_effective_length_counts_strictly_above_eps():
    r = np.array([1.0, 1e-8, 2e-8, 0.0], dtype=np.float32)
    assert rl.effective_length(r, np.array([0, 4]), eps=1e-8)[0] == 2
    assert rl.effective_length(r, np.array([0, 4]), eps=0.0)[0] == 3


def test_top_p_acceptance_hand_worked():
    ids = np.array([[10, 11, 12, 13]] * 4)
    # unsorted on purpose: teacher probs 0.3, 0.6, 0.05, 0.05; with p = 0.85 the nucleus is {11, 10}
    lp = np.log(np.array([[0.3, 0.6, 0.05, 0.05]] * 4, dtype=np.float32))
    y = np.array([10, 11, 12, 99])
    np.testing.assert_array_equal(rl.topp_bad_events(y, ids, lp, 0.85), [False, False, True, True])
    # top-k mass 0.5 < p: the visible nucleus is the whole top-k (conservative rule of App. A.10)
    lp_small = np.log(np.array([[0.2, 0.1, 0.1, 0.1]] * 4, dtype=np.float32))
    np.testing.assert_array_equal(rl.topp_bad_events(y, ids, lp_small, 0.95), [False, False, False, True])


def _topp_reference(y, ids, lp, p):
    order = np.argsort(-lp, kind="stable")
    nucleus, mass = [], 0.0
    for j in order:
        nucleus.append(ids[j])
        mass += math.exp(lp[j])
        if mass >= p:
            break
    return y not in nucleus


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 16), st.floats(0.3, 0.99), st.integers(0, 2**31 - 1))
def test_top_p_matches_sort_and_cumsum_reference(n, k, p, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(100, k, replace=False) for _ in range(n)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(k + 1), size=n)[:, :k]  # leave some mass outside the top-k
    lp = np.log(probs).astype(np.float32)
    y = np.where(rng.random(n) < 0.8, ids[np.arange(n), rng.integers(0, k, n)], 1000)
    got = rl.topp_bad_events(y, ids, lp, p)
    want = [_topp_reference(y[i], ids[i], lp[i].astype(np.float64), p) for i in range(n)]
    np.testing.assert_array_equal(got, want)


def test_opd_reward_hand_worked():
    lp = np.log(np.array([[0.75, 0.25]], dtype=np.float32))
    lq = np.log(np.array([[0.5, 0.5]], dtype=np.float32))
    want = [[-0.75 * math.log(1.5), -0.25 * math.log(0.5)]]
    np.testing.assert_allclose(rl.opd_reward(lp, lq), want, rtol=1e-6)
    # the softmax renormalises over the k cached entries: a constant shift changes nothing
    np.testing.assert_allclose(rl.opd_reward(lp - 3.0, lq - 3.0), want, rtol=1e-5)


def test_to_padded_zero_on_padding():
    offsets = np.array([0, 3, 4])
    weight = rl.loss_weight(np.array([1.0, 0.5, 0.0, 1.0], dtype=np.float32), 0.5)
    dense = rl.to_padded(weight, offsets)
    np.testing.assert_allclose(dense, [[1.5, 1.0, 0.5], [1.5, 0.0, 0.0]])


ragged = st.lists(st.lists(st.booleans(), min_size=0, max_size=60), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(ragged, st.floats(0.0, 0.6), st.floats(0.0, 1.0))
def test_properties(bads, w_drop, w_base):
    offsets = np.concatenate(([0], np.cumsum([len(b) for b in bads])))
    bad = np.array([x for b in bads for x in b], dtype=bool)
    r = rl.reliability(rl.cumulative_bad(bad, offsets), w_drop)
    lengths = np.diff(offsets)
    e = rl.effective_length(r, offsets)
    assert ((r >= 0) & (r <= 1)).all()
    assert (e <= lengths).all() and (e >= 0).all()
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        assert (np.diff(r[a:b]) <= 0).all()  # R non-increasing along a response
    dense_l = rl.to_padded(rl.loss_weight(r, w_base), offsets, width=70)
    pad = np.arange(70)[None, :] >= lengths[:, None]
    assert (dense_l[pad] == 0).all()  # L = 0 on padding
    assert np.allclose(dense_l[~pad], r + np.float32(w_base))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_ragged_math_matches_torch_reference(b, t, seed):
    rng = np.random.default_rng(seed)
    k = 8
    s = np.stack([[rng.choice(12, k, replace=False) for _ in range(t)] for _ in range(b)])
    tt = np.stack([[rng.choice(12, k, replace=False) for _ in range(t)] for _ in range(b)])
    lengths = rng.integers(0, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    ref = prune_opd_weights(torch.from_numpy(s), torch.from_numpy(tt), torch.from_numpy(mask), w_drop=0.2)

    offsets = np.concatenate(([0], np.cumsum(lengths)))
    o = rl.topk_overlap(s[mask].astype(np.int32), tt[mask].astype(np.int32))
    r = rl.reliability(rl.cumulative_bad(rl.overlap_bad_events(o, 0.7), offsets), 0.2)
    np.testing.assert_allclose(rl.to_padded(o, offsets, t), ref["overlap"].numpy() * mask, atol=1e-7)
    np.testing.assert_allclose(rl.to_padded(r, offsets, t), ref["reliability"].numpy(), atol=1e-6)
    np.testing.assert_allclose(
        rl.to_padded(rl.loss_weight(r, 0.5), offsets, t), ref["weight"].numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(rl.effective_length(r, offsets), ref["effective_len"].numpy())


def _naive_keep(rel, mass, match, seed, eps=1e-8):
    """The random arm's matching, written out: walk a seeded permutation until the retention is reached."""
    rel, mass = list(rel), list(mass) if match == "mass" else [1.0] * len(rel)
    total = sum(mass)
    if match == "fraction":
        target = sum(r > eps for r in rel) / len(rel)
    else:
        target = sum(r * m for r, m in zip(rel, mass, strict=True)) / total
    keep, got = [False] * len(rel), 0.0
    for i in np.random.default_rng(seed).permutation(len(rel)):
        if target == 0 or (any(keep) and got >= target * total - 1e-9):  # >= 1 kept when target > 0
            break
        keep[i], got = True, got + mass[i]
    return np.array(keep), target


def test_random_keep_mask_hand_worked():
    rel = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    mass = np.array([1.0, 2.0, 3.0, 4.0])
    keep, target, achieved = rl.random_keep_mask(rel, mass, "mass", np.random.default_rng(7))
    assert target == pytest.approx(0.4)  # (1 + 3) / 10
    assert achieved >= 0.4 and achieved == pytest.approx(mass[keep].sum() / 10)
    # smallest prefix of the seeded order: without the last position taken it falls short
    order = np.random.default_rng(7).permutation(4)
    n = int(keep.sum())
    assert set(np.flatnonzero(keep)) == set(order[:n]) and mass[order[: n - 1]].sum() < 4.0
    keep, target, _ = rl.random_keep_mask(
        np.array([1e-9, 0.5, 0.0, 1.0]), None, "fraction", np.random.default_rng(0)
    )
    assert target == 0.5 and keep.sum() == 2  # R = 1e-9 is not above eps (eq. 12)
    keep, target, achieved = rl.random_keep_mask(np.zeros(5), np.ones(5), "mass", np.random.default_rng(0))
    assert target == achieved == 0.0 and not keep.any()
    with pytest.raises(ValueError, match="match"):
        rl.random_keep_mask(rel, mass, "tokens", np.random.default_rng(0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=60),
    st.sampled_from(["fraction", "mass"]),
    st.integers(0, 1000),
)
def test_random_keep_mask_matches_naive_walk(rel, match, seed):
    rel = np.array(rel)
    mass = np.random.default_rng(seed + 1).uniform(0.01, 3.0, len(rel))
    keep, target, achieved = rl.random_keep_mask(rel, mass, match, np.random.default_rng(seed))
    want, want_target = _naive_keep(rel, mass, match, seed)
    assert target == pytest.approx(want_target)
    np.testing.assert_array_equal(keep, want)
    m = mass if match == "mass" else np.ones(len(rel))
    assert achieved == pytest.approx(m[keep].sum() / m.sum()) and achieved >= target - 1e-9


@pytest.mark.parametrize("w_drop", [0.01, 0.08, 0.1, 1 / 3, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_events_to_zero_is_where_reliability_is_first_spent(w_drop, eps):
    c = 0  # counted up: the first C with max(0, 1 - w_drop * C) <= eps
    while max(0.0, 1 - w_drop * c) > eps:
        c += 1
    assert rl.events_to_zero(w_drop, eps) == c


def test_events_to_zero_is_none_without_a_penalty():
    assert rl.events_to_zero(0.0) is None
