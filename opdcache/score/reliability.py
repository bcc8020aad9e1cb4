"""Prune-OPD reliability math (Yang et al., 2026, §3 and App. A.10). Arrays in, arrays out, no I/O.

Responses are *ragged*: per-position values of all responses are concatenated into one flat array
of N positions, and ``offsets`` (int64, length B+1, ``offsets[0] == 0``) marks where each of the B
responses starts and ends, exactly the layout of an Arrow list column. Only valid (generated)
positions exist in this layout; :func:`to_padded` gives the dense ``[B, T]`` view with zeros on
padding, which is where "L = 0 on padding" (eq. 10) becomes visible.

Released-code semantics: bad events only on valid positions, the cumulative count C includes the
current position (eq. 8), and E counts positions with R > eps, eps = 1e-8 (eq. 12).
"""

from __future__ import annotations

import math

import numba
import numpy as np

EPS = 1e-8


@numba.njit(cache=True, nogil=True)
def _overlap_counts(student_ids, teacher_ids, out):
    n, k = student_ids.shape
    kt = teacher_ids.shape[1]
    for i in range(n):
        c = 0
        for a in range(k):
            s = student_ids[i, a]
            hit = 0
            for b in range(kt):
                hit |= teacher_ids[i, b] == s
            c += hit
        out[i] = c


def topk_overlap(student_ids: np.ndarray, teacher_ids: np.ndarray) -> np.ndarray:
    """Eq. 6: O_tau = |TopK_S ∩ TopK_T| / k for each position; ``[N, k]`` int ids -> ``[N]`` float32.

    Ids within one top-k set are distinct (they are a top-k of one distribution).
    """
    s, t = _as_ids(student_ids, "student_ids"), _as_ids(teacher_ids, "teacher_ids")
    if s.shape != t.shape:
        raise ValueError(f"student_ids {s.shape} and teacher_ids {t.shape} must have equal shapes")
    counts = np.empty(s.shape[0], dtype=np.int32)
    _overlap_counts(s, t, counts)
    return counts.astype(np.float32) / np.float32(s.shape[1])


def overlap_bad_events(overlap: np.ndarray, gamma: float) -> np.ndarray:
    """Eq. 7: B_tau = 1[O_tau < gamma]."""
    return np.asarray(overlap) < np.float32(gamma)


@numba.njit(cache=True, nogil=True)
def _topp_bad(sampled, teacher_ids, teacher_logprobs, p, out):
    n, k = teacher_ids.shape
    for i in range(n):
        j = -1
        for b in range(k):
            if teacher_ids[i, b] == sampled[i]:
                j = b
        if j < 0:
            out[i] = True
            continue
        # y is in the visible nucleus iff the teacher mass ranked strictly before it is < p
        # (eqs. 15-16, ties broken by position); if the whole top-k mass is < p this always
        # holds, which is the conservative A = K rule of App. A.10.
        qj = teacher_logprobs[i, j]
        before = 0.0
        for b in range(k):
            qb = teacher_logprobs[i, b]
            if qb > qj or (qb == qj and b < j):
                before += np.exp(np.float64(qb))
        out[i] = before >= p


def topp_bad_events(
    sampled_ids: np.ndarray, teacher_ids: np.ndarray, teacher_logprobs: np.ndarray, top_p: float
) -> np.ndarray:
    """App. A.10, eqs. 14-16: B_tau = 1[y_tau ∉ A_tau(p, k)], the teacher's visible top-p nucleus.

    ``teacher_logprobs`` are full-vocabulary log-probabilities at ``teacher_ids`` (any order). When
    the top-k mass is below ``top_p`` the nucleus is the whole top-k.
    """
    t = _as_ids(teacher_ids, "teacher_ids")
    y = np.ascontiguousarray(sampled_ids)
    lp = np.ascontiguousarray(teacher_logprobs, dtype=np.float32)
    if y.shape != (t.shape[0],) or lp.shape != t.shape:
        raise ValueError(
            f"sampled_ids {y.shape}, teacher_ids {t.shape}, teacher_logprobs {lp.shape}: "
            "expected [N], [N, k], [N, k]"
        )
    out = np.empty(t.shape[0], dtype=np.bool_)
    _topp_bad(y.astype(t.dtype, copy=False), t, lp, float(top_p), out)
    return out


def cumulative_bad(bad: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Eq. 8: C_tau = sum_{i <= tau} B_i within each response (inclusive of tau); int32 [N]."""
    bad = np.asarray(bad, dtype=np.int32)
    offsets = np.asarray(offsets, dtype=np.int64)
    cs = np.cumsum(bad, dtype=np.int32)
    before = np.concatenate(([0], cs))[offsets[:-1]]  # count before each response starts
    return cs - np.repeat(before, np.diff(offsets))


def reliability(cumulative: np.ndarray, w_drop: float) -> np.ndarray:
    """Eq. 9: R_tau = clip(1 - w_drop * C_tau, 0, 1); float32 [N]."""
    r = np.float32(1.0) - np.float32(w_drop) * np.asarray(cumulative, dtype=np.float32)
    return np.clip(r, np.float32(0.0), np.float32(1.0))


def events_to_zero(w_drop: float, eps: float = EPS) -> int | None:
    """The least bad-event count C with R = clip(1 - w_drop C, 0, 1) <= eps (eqs. 9, 12, in eq. 9's
    float32): where a response's reliability is spent. None when w_drop = 0 (never)."""
    if w_drop <= 0:
        return None
    c = max(1, math.ceil((1 - eps) / w_drop) - 2)
    while reliability(np.array([c]), w_drop)[0] > eps:
        c += 1
    return c


def loss_weight(rel: np.ndarray, w_base: float) -> np.ndarray:
    """Eq. 10: L_tau = R_tau + w_base on valid positions (padding is absent in the ragged layout)."""
    return np.asarray(rel, dtype=np.float32) + np.float32(w_base)


def effective_length(rel: np.ndarray, offsets: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Eq. 12: E = #{tau : R_tau > eps} per response; int32 [B]."""
    cs = np.concatenate(([0], np.cumsum(np.asarray(rel) > eps, dtype=np.int64)))
    offsets = np.asarray(offsets, dtype=np.int64)
    return (cs[offsets[1:]] - cs[offsets[:-1]]).astype(np.int32)


def opd_reward(student_topk_logprobs: np.ndarray, teacher_on_student_topk: np.ndarray) -> np.ndarray:
    """Raw OPD reward on the student's top-k ids (§2.1, input to eqs. 11/13); ``[N, k]`` float32.

    r_{tau,j} = -softmax_k(log p)_j * (log p(j) - log q(j)), with the softmax renormalised over the
    k cached student log-probabilities. Eq. 11 scales it by L_tau: ``opd_reward(...) * L[:, None]``.
    """
    lp = np.asarray(student_topk_logprobs, dtype=np.float32)
    lq = np.asarray(teacher_on_student_topk, dtype=np.float32)
    w = np.exp(lp - lp.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return -w * (lp - lq)


def topk_reverse_kl(student_topk_logprobs: np.ndarray, teacher_on_student_topk: np.ndarray) -> np.ndarray:
    """Top-k reverse KL per position, ``[N]``: sum_j softmax_k(log p)_j (log p(j) - log q(j)) over the
    student's top-k ids, i.e. minus the summed OPD reward (the quantity OPD lowers; evaluation metric)."""
    return -opd_reward(student_topk_logprobs, teacher_on_student_topk).sum(axis=-1)


def iw_opd_weights(
    student_logprob: np.ndarray,
    teacher_logprob: np.ndarray,
    offsets: np.ndarray,
    gamma: float,
    eps: float = EPS,
) -> np.ndarray:
    """IW-OPD's position weights (TRL's IWOPDTrainer; Xie et al., 2026, arXiv 2606.22600), float32 [N].

    With a_tau = log q(y_tau) - log p(y_tau) (teacher minus rollout policy at the sampled token), S_<tau
    the sum of |a| over the response's earlier positions (exclusive) and S its total over the response:
    w_tau = 1 + gamma (1 - S_<tau / max(S, eps)), in [1, 1 + gamma]; the first position gets 1 + gamma.
    """
    a = np.abs(np.asarray(teacher_logprob, np.float64) - np.asarray(student_logprob, np.float64))
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    cs = np.concatenate(([0.0], np.cumsum(a)))
    start = np.repeat(cs[offsets[:-1]], lengths)
    before = cs[:-1] - start  # exclusive prefix sum within the response
    total = np.repeat(cs[offsets[1:]] - cs[offsets[:-1]], lengths)
    return (1.0 + gamma * (1.0 - before / np.maximum(total, eps))).astype(np.float32)


def grpo_advantages(
    outcome: np.ndarray, groups: np.ndarray, std_norm: bool = True, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """GRPO's outcome advantage per response (paper App. A.4's unreliable-suffix signal); verl's form.

    Over the responses of one prompt (same ``groups`` value): A_i = (o_i - mean) / (std + eps) with the
    unbiased std, or A_i = o_i - mean with ``std_norm=False`` (Dr. GRPO). A group whose outcomes are
    all equal gets 0; a group of one response has no baseline, and gets o_i / (1 + eps) (verl: mean 0,
    std 1). Returns (A [B] float32, zero-variance flag per response [B] bool: its group is all equal).
    """
    o = np.asarray(outcome, dtype=np.float64)
    g = np.asarray(groups)
    if o.shape != g.shape or o.ndim != 1:
        raise ValueError(f"outcome {o.shape} and groups {g.shape} must be equal 1-D shapes")
    adv = np.zeros(len(o))
    flat_group = np.zeros(len(o), dtype=bool)
    for key in np.unique(g):
        idx = np.flatnonzero(g == key)
        vals = o[idx]
        mean, std = (0.0, 1.0) if len(idx) == 1 else (vals.mean(), vals.std(ddof=1))
        adv[idx] = (vals - mean) / (std + eps) if std_norm else vals - mean
        flat_group[idx] = len(idx) > 1 and bool(np.all(vals == vals[0]))
    return adv.astype(np.float32), flat_group


def random_keep_mask(
    rel: np.ndarray, mass: np.ndarray, match: str, rng: np.random.Generator, eps: float = EPS
) -> tuple[np.ndarray, float, float]:
    """The random control arm's kept positions for one round, matched to a reference variant.

    Positions are taken in a uniformly random order until their ``mass`` reaches the reference's
    retention: ``match="fraction"`` (mass = 1 per position) matches the kept token fraction
    mean[R > eps] (eq. 12's criterion); ``match="mass"`` (mass = sum_j |r_tau,j|, the OPD reward of
    eq. 11 before L) matches the kept reward mass sum(R mass) / sum(mass). The smallest such prefix
    of the order is kept. Returns (keep mask [N] bool, target retention, achieved retention).
    """
    if match not in ("fraction", "mass"):
        raise ValueError(f"match must be fraction or mass, got {match!r}")
    rel = np.asarray(rel)
    mass = np.ones(len(rel)) if match == "fraction" else np.asarray(mass, dtype=np.float64)
    if len(mass) != len(rel):
        raise ValueError(f"rel and mass differ in length ({len(rel)} vs {len(mass)})")
    total = mass.sum()
    if match == "fraction":
        target = float((rel > eps).mean()) if len(rel) else 0.0
    else:
        target = float((rel * mass).sum() / total) if total > 0 else 0.0
    order = rng.permutation(len(mass))
    cum = np.cumsum(mass[order])
    n_keep = (
        int(np.searchsorted(cum, target * cum[-1] - 1e-9, side="left")) + 1 if len(cum) and target > 0 else 0
    )
    keep = np.zeros(len(mass), dtype=bool)
    keep[order[:n_keep]] = True
    achieved = float(mass[keep].sum() / total) if total > 0 else 0.0
    return keep, target, achieved


def to_padded(values: np.ndarray, offsets: np.ndarray, width: int | None = None) -> np.ndarray:
    """Ragged ``[N]`` -> dense ``[B, T]`` with zeros on padding (so L = 0 there, eq. 10)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    width = int(lengths.max(initial=0)) if width is None else width
    if lengths.max(initial=0) > width:
        raise ValueError(f"width {width} is shorter than the longest response ({lengths.max()})")
    out = np.zeros((len(lengths), width), dtype=np.asarray(values).dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    out[rows, cols] = values
    return out


def _as_ids(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer [N, k] array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)
