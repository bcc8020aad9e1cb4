"""Results that repeat (issue 31): each prompt's samples draw from a generator seeded by its own key
(run seed, round, prompt id), so a sample does not depend on the batch it shares, the order requests
arrive in, a fresh engine, or the budget it is cut at; two runs of one config write the same cache and
the same evaluation."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from opdcache.cache.shards import read_cache_shard
from opdcache.loop import Residents, run_rounds, start_run
from opdcache.models.tiny import build_tiny_model
from opdcache.rollout import engine
from opdcache.rollout.stage import rollout_round
from opdcache.rundir import RunDir

pytest.importorskip("vllm")
K = 8
T = 1.0


def test_request_seeds_are_stable_and_their_sample_ranges_do_not_meet():
    n = 4
    seeds = [engine.request_seed(n, 0, 0, f"q{i}") for i in range(2000)]
    assert seeds == [engine.request_seed(n, 0, 0, f"q{i}") for i in range(2000)]
    assert all(0 <= s and s + n <= 2**31 for s in seeds)
    ranges = sorted(seeds)
    assert all(b - a >= n for a, b in zip(ranges, ranges[1:], strict=False))  # sample j of one is no other's
    assert engine.request_seed(n, 0, 1, "q0") != seeds[0] and engine.request_seed(n, 1, 0, "q0") != seeds[0]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("spread") / "student", seed=3, embedding_scale=1.5)
    llm = engine.make_llm(str(path), K, 128, 0, kv_cache_gib=1)  # spread out: distinct draws show
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(f"Question: {i} + {i + 1} = ?\nAnswer:")["input_ids"] for i in range(6)]
    yield llm, prompts
    engine.shutdown(llm)


def _tokens(outs):
    return [[list(c.token_ids) for c in out.outputs] for out in outs]


def test_a_prompt_samples_the_same_whatever_batch_order_or_budget(student):
    llm, prompts = student
    n = 3
    seeds = [engine.request_seed(n, 7, 0, f"q{i}") for i in range(len(prompts))]
    whole = _tokens(engine.generate(llm, prompts, n, T, 24, K, seeds=seeds))
    backwards = _tokens(engine.generate(llm, prompts[::-1], n, T, 24, K, seeds=seeds[::-1]))[::-1]
    alone = [
        _tokens(engine.generate(llm, [p], n, T, 24, K, seeds=[s]))[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert whole == backwards == alone
    for samples in whole:  # the samples of one prompt are distinct draws
        assert len({tuple(t) for t in samples}) == n
    short = _tokens(engine.generate(llm, prompts, n, T, 8, K, seeds=seeds))
    assert short == [[t[:8] for t in samples] for samples in whole]  # M_0's response begins M_max's
    other = _tokens(engine.generate(llm, prompts, n, T, 24, K, seeds=[s + 1000 for s in seeds]))
    assert (
        sum(a != b for x, y in zip(whole, other, strict=True) for a, b in zip(x, y, strict=True))
        >= n * len(prompts) - 2
    )


def test_a_streamed_request_with_an_abort_beside_it_samples_what_generate_does(student):
    llm, prompts = student
    n = 2
    seeds = [engine.request_seed(n, 3, 1, f"q{i}") for i in range(len(prompts))]
    want = _tokens(engine.generate(llm, prompts, n, 1.0, 20, K, seeds=seeds))
    ids = engine.submit_streaming(llm, prompts, n, 1.0, 20, K, "s", seeds)
    got: dict[str, list[int]] = {rid: [] for row in ids for rid in row}
    aborted = ids[0][0]
    while llm.llm_engine.has_unfinished_requests():
        for out in engine.step(llm):
            if out.request_id in got:  # not one streamed before its abort took effect
                got[out.request_id] += list(out.outputs[0].token_ids)
        if aborted in got and len(got[aborted]) >= 3:
            engine.abort(llm, [aborted])
            got.pop(aborted)
    for i, row in enumerate(ids):
        for j, rid in enumerate(row):
            if rid != aborted:
                assert got[rid] == want[i][j], (i, j)


def _cache_rows(run: RunDir, r: int, stage: str = "cache") -> dict[tuple[str, int], list[int]]:
    base = run.cache_round(r) if stage == "cache" else run.rollout_round(r)
    rows = {}
    for part in run.shards(base):
        table, _ = read_cache_shard(part, rollout=stage != "cache")
        for row in table.to_pylist():
            rows[(row["prompt_id"], row["sample"])] = list(row["response_ids"])
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["prune", "prune-inflight"])
def test_runs_of_one_config_write_the_same_cache_and_evaluation_on_fresh_or_shared_engines(
    tiny_overrides, models, tmp_path, arm
):
    sets = [
        *tiny_overrides,
        f"arm.name={arm}",
        f"eval.data={models / 'prompts.jsonl'}",
        "eval.n=2",
        "eval.max_tokens=16",
        "eval.temperature=1.0",
        "eval.checker=exact",
    ]
    runs = []
    for name in ("a", "b"):  # each with its own engine, started fresh
        run = RunDir(tmp_path / name)
        run_rounds(run, 2, start_run(None, run, sets), progress=False)
        runs.append(run)
    with Residents() as shared:  # the demos' way: c's engine is b2's, reloaded with the round-0 student
        for name in ("b2", "c"):
            run = RunDir(tmp_path / name)
            cfg = start_run(None, run, sets)
            shared.warm(run, cfg, 2)
            run_rounds(run, 2, cfg, progress=False, residents=shared)
        assert shared.engines is not None and shared.engines.starts == 1
    runs.append(run)
    a = runs[0]
    for r in (0, 1):
        rows = [_cache_rows(run, r) for run in runs]
        assert rows[0].keys() == rows[1].keys() == rows[2].keys() and len(rows[0]) == 12
        for other in rows[1:]:
            assert [k for k in rows[0] if rows[0][k] != other[k]] == []
    for r in (0, 1, 2):
        want = json.loads(a.eval_result(r).read_text())["per_prompt"]
        for run in runs[1:]:
            assert json.loads(run.eval_result(r).read_text())["per_prompt"] == want


@pytest.mark.slow
def test_arms_sharing_a_checkpoint_share_their_round_0_samples(tiny_overrides, tmp_path):
    rows = {}
    for arm, extra in (("opd", []), ("truncate", ["arm.truncate_tokens=16"])):
        run = RunDir(tmp_path / arm)
        cfg = start_run(None, run, [*tiny_overrides, f"arm.name={arm}", *extra])
        budget = 256 if arm == "opd" else 16
        rollout_round(run, 0, cfg, budget, progress=False)
        rows[arm] = _cache_rows(run, 0, "rollout")
    assert rows["opd"].keys() == rows["truncate"].keys()
    for key, short in rows["truncate"].items():
        assert short == rows["opd"][key][: len(short)], key
    assert np.mean([len(t) == 16 for t in rows["truncate"].values()]) > 0.5  # most were cut at 16
