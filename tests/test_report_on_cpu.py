import csv
import json

from opdcache.cli import main
from opdcache.report import make_report
from opdcache.rundir import RunDir


def _eval(run, r, acc, **distill):
    p = RunDir(run).eval_result(r)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        json.dumps(
            {
                "accuracy": acc,
                "pass_at_n": acc,
                "n": 4,
                "prompts": 8,
                "mean_response_tokens": 100.0,
                "truncated": 0.0,
                "seconds": 1.0,
                **distill,
            }
        )
    )


def _distill(kl, bands):
    """Distillation fields of an eval result (opdcache eval --teacher): band start -> overlap."""
    return {"topk_kl": kl, "full_kl": 2 * kl, "band": 32, "overlap_by_band": bands,
            "kl_by_band": {b: kl + 0.1 * i for i, b in enumerate(bands)}}  # fmt: skip


def test_report_writes_every_figure_from_the_sql(synth_run, tmp_path):
    run = synth_run.root
    assert main(["init", str(run), "--set", "budget.initial=256", "--set", "budget.min=64"]) == 0
    assert main(["score", str(run), "--quiet"]) == 0
    for r in (0, 1):
        assert main(["budget", str(run), "--round", str(r)]) == 0
    with (RunDir(run).root / "stage_times.jsonl").open("w") as f:
        for r, s in [(0, 10.0), (1, 30.0)]:
            f.write(
                json.dumps(
                    {
                        "run": "main",
                        "round": r,
                        "stage": "train",
                        "seconds": s,
                        "skipped": False,
                        "host": "h",
                        "finished_at": 0.0,
                    }
                )
                + "\n"
            )
        f.write(
            json.dumps(
                {
                    "run": "main",
                    "round": 0,
                    "stage": "eval",
                    "seconds": 99.0,
                    "work_seconds": 92.0,  # 7 s of it started the engine the rollouts then use
                    "skipped": False,
                    "host": "h",
                    "finished_at": 0.0,
                }
            )
            + "\n"
        )
    _eval(run, 0, 0.25, **_distill(1.2, {"0": 0.45, "32": 0.5}))
    _eval(run, 1, 0.3)  # accuracy only: not in the distillation figures
    _eval(run, 2, 0.5, **_distill(0.6, {"0": 0.55, "32": 0.6, "64": 0.58}))
    assert main(["replay", str(run), "--variant", "g0.8", "--gamma", "0.8", "--no-train", "--quiet"]) == 0
    assert main(["replay", str(run), "--variant", "g0.6", "--gamma", "0.6", "--no-train", "--quiet"]) == 0
    out = tmp_path / "rep"
    md = make_report([run], out, band_scale=64, bucket=64)
    text = md.read_text()
    stems = ("accuracy_vs_time", "budget", "weight_by_position", "overlap_by_depth", "gamma_sweep")
    for stem in (*stems, "distill_vs_time", "eval_overlap_by_depth"):
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert f"({stem}.png)" in text
    acc = list(csv.DictReader((out / "accuracy_vs_time.csv").open()))
    # checkpoint 2 was produced by rounds 0 and 1 (40 s) and the engine start-up made by the round-0
    # evaluation (7 s); the evaluation itself is not training time
    got = [
        (int(a["round"]), float(a["wall_seconds"]), float(a["work_seconds"]), float(a["accuracy"]))
        for a in acc
    ]
    assert got == [(0, 0.0, 0.0, 0.25), (1, 17.0, 10.0, 0.3), (2, 47.0, 40.0, 0.5)]
    dist = [
        (int(a["round"]), float(a["wall_seconds"]), float(a["topk_kl"]), float(a["full_kl"]))
        for a in csv.DictReader((out / "distill_vs_time.csv").open())
    ]
    assert dist == [(0, 0.0, 1.2, 2.4), (2, 47.0, 0.6, 1.2)]
    bands = [
        (int(a["round"]), int(a["band_start"]), float(a["mean_overlap"]), float(a["mean_topk_kl"]))
        for a in csv.DictReader((out / "eval_overlap_by_depth.csv").open())
    ]
    assert bands == [
        (0, 0, 0.45, 1.2),
        (0, 32, 0.5, 1.3),
        (2, 0, 0.55, 0.6),
        (2, 32, 0.6, 0.7),
        (2, 64, 0.58, 0.8),
    ]
    sweep = (out / "gamma_sweep.csv").read_text().splitlines()[1:]
    e = {float(line.split(",")[2]): float(line.split(",")[4]) for line in sweep if line.split(",")[3] == "0"}
    assert set(e) == {0.6, 0.8} and e[0.8] <= e[0.6]  # a stricter gamma never lengthens E


def test_report_cli_names_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from opdcache.rundir import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.md", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.md").stat().st_mode & 0o777 == 0o666 & ~old


def test_demo_seed_table_averages_each_pair_and_arm():
    from opdcache.demos.runner import seed_means_markdown

    rows = [
        {
            "pair": "low",
            "arm": arm,
            "seed": seed,
            "accuracy_final": acc,
            "time_vs_opd": 1.0 if arm == "opd" else t,
            "work_vs_opd": 1.0 if arm == "opd" else t / 2,
            "last_mean_effective_len": 150.0 + seed,
        }
        for arm in ("opd", "prune")
        for seed, acc, t in ((0, 0.5, 0.6), (1, 0.7, 0.8))
    ]
    table = seed_means_markdown(rows)
    assert "| low | prune | 2 | 0.600 ± 0.141 | 0.70 | 0.35 | 150 |" in table
    assert "| low | opd | 2 | 0.600 ± 0.141 | 1.00 | 1.00 | 150 |" in table
    assert "| high |" not in table  # no rows, no line
