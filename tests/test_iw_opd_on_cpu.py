"""IW-OPD's position weights (reliability.iw_opd_weights), against a hand-worked case and TRL's padded
formula restated in torch: a = |log q - log p|, w = 1 + gamma (1 - (cumsum(a) - a) / max(sum(a), eps))."""

import numpy as np
import pytest
import torch

from opdcache.score import reliability as rl


def test_hand_worked():
    # response 1: |a| = 1, 2, 1 (total 4); response 2: |a| = 0, 0 (total clamped to eps)
    lp = np.array([-1.0, -1.0, -2.0, -0.5, -0.5], np.float32)
    lq = np.array([-2.0, -3.0, -1.0, -0.5, -0.5], np.float32)
    w = rl.iw_opd_weights(lp, lq, np.array([0, 3, 5]), gamma=0.5)
    np.testing.assert_allclose(w, [1.5, 1.375, 1.125, 1.5, 1.5], rtol=1e-6)


def test_matches_trl_padded_form():
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 3]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    lp = -rng.exponential(size=offsets[-1]).astype(np.float32)
    lq = -rng.exponential(size=offsets[-1]).astype(np.float32)
    got = rl.iw_opd_weights(lp, lq, offsets, gamma=0.7)
    width = max(lengths)
    pad_p, pad_q = torch.zeros(len(lengths), width), torch.zeros(len(lengths), width)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        pad_p[i, : b - a] = torch.from_numpy(lp[a:b])
        pad_q[i, : b - a] = torch.from_numpy(lq[a:b])
    a_opd = (pad_q - pad_p).abs()  # padding is 0 on both sides
    prefix = a_opd.cumsum(dim=1) - a_opd
    total = a_opd.sum(dim=1, keepdim=True).clamp_min(1e-8)
    want = 1.0 + 0.7 * (1.0 - prefix / total)
    flat = np.concatenate([want[i, :n].numpy() for i, n in enumerate(lengths)])
    np.testing.assert_allclose(got, flat, rtol=1e-5)
    assert got.min() >= 1.0 - 1e-6 and got.max() <= 1.7 + 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_weights_fall_along_a_response(gamma):
    w = rl.iw_opd_weights(np.zeros(4, np.float32), np.full(4, -1.0, np.float32), np.array([0, 4]), gamma)
    np.testing.assert_allclose(w, 1 + gamma * np.array([1.0, 0.75, 0.5, 0.25]), rtol=1e-6)


def test_score_stage_writes_iw_weights_from_the_cache(synth_run):
    """`opdcache score --metric iw`: the weight column is TRL's formula on the cached sampled-token
    log-probs (restated here per response), R = 1 and E = the response length."""
    import pyarrow.parquet as pq

    from opdcache.cli import main

    assert (
        main(
            [
                "score",
                str(synth_run.root),
                "--variant",
                "iw",
                "--metric",
                "iw",
                "--iw-gamma",
                "0.4",
                "--quiet",
            ]
        )
        == 0
    )
    for part in synth_run.shards(synth_run.cache_round(0)):
        cache = pq.read_table(part).to_pylist()
        scores = pq.read_table(synth_run.score_round("iw", 0) / part.name).to_pylist()
        for c, s in zip(cache, scores, strict=True):
            a = np.abs(
                np.array(c["teacher_logprob"], np.float64) - np.array(c["student_logprob"], np.float64)
            )
            before = np.concatenate(([0.0], np.cumsum(a)[:-1]))
            want = 1 + 0.4 * (1 - before / max(a.sum(), 1e-8))
            np.testing.assert_allclose(s["weight"], want, rtol=1e-5)
            assert s["reliability"] == [1.0] * len(a) and s["effective_len"] == len(a)
    assert main(["score", str(synth_run.root), "--variant", "x", "--gamma", "0.5", "--iw-gamma", "0.4"]) == 2
