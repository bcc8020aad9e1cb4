"""Which checkpoints train.keep_checkpoints removes (train/retention.py), on hand-made checkpoint dirs."""

import dataclasses
import json

import pytest

from opdcache.config import RunConfig
from opdcache.rundir import RunDir
from opdcache.train.retention import prune_checkpoints


def fake_checkpoints(run: RunDir, rounds: range) -> None:
    for r in rounds:
        d = run.checkpoint(r)
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w" * (100 + r))
        (d / "tokenizer.json").write_text("{}")
        (d / "opdcache_train.json").write_text(json.dumps({"round": r - 1}))


def config(keep: int, eval_data: str = "", every: int = 1) -> RunConfig:
    c = RunConfig()
    return dataclasses.replace(
        c,
        train=dataclasses.replace(c.train, keep_checkpoints=keep),
        eval=dataclasses.replace(c.eval, data=eval_data, every=every),
    )


def weights(run: RunDir) -> list[int]:
    return [r for r in run.rounds(run.checkpoints) if (run.checkpoint(r) / "model.safetensors").exists()]


@pytest.mark.parametrize(
    ("keep", "evals", "every", "written", "kept"),
    [
        (0, "", 1, [], [1, 2, 3, 4, 5]),  # 0 keeps all
        (2, "", 1, [], [4, 5]),
        (1, "", 1, [], [5]),
        (9, "", 1, [], [1, 2, 3, 4, 5]),
        # an eval every 2 rounds that has not read round 2 yet keeps it; round 4's is written
        (1, "e.jsonl", 2, [4], [2, 5]),
        (2, "e.jsonl", 1, [1, 2, 3], [4, 5]),
    ],
)
def test_which_checkpoints_lose_their_weights(tmp_path, keep, evals, every, written, kept):
    run = RunDir(tmp_path / "run")
    fake_checkpoints(run, range(1, 6))
    run.evals.mkdir(parents=True)
    for r in written:
        run.eval_result(r).write_text("{}")
    removed = prune_checkpoints(run, config(keep, evals, every), newest=5)
    assert weights(run) == kept
    assert removed == [r for r in range(1, 6) if r not in kept]
    for r in removed:
        d = run.checkpoint(r)
        assert sorted(p.name for p in d.iterdir()) == ["opdcache_removed.json", "opdcache_train.json"]
        rec = json.loads((d / "opdcache_removed.json").read_text())
        assert rec["round"] == r and rec["bytes"] == 100 + r + 2 + 2  # weights, config.json, tokenizer.json
        assert rec["after_round"] == 4
    assert prune_checkpoints(run, config(keep, evals, every), newest=5) == []  # nothing twice
