"""``opdcache probe``: before any training, does Prune-OPD have something to prune on this pair?

    opdcache probe OUT --teacher T --student S --data F [--n 64] [--max-tokens 256] [--gamma G]

OUT becomes a run (config.yaml, cache/round=0, scores/): ``n`` prompts of F sampled once by the
student (vLLM, T = 1, budget ``max_tokens``), the teacher's gathering forward on the same prefixes, and
two score variants: ``paper`` (gamma 0.7) and ``probe`` (the gamma used: ``--gamma``, or the suggestion
below). From the run's ``tokens`` view it writes OUT/probe/probe.md, probe.json and probe.png:

- overlap (eq. 6) and bad-event rate (eq. 7) by response depth, in bands of ``band`` tokens;
- the effective length E (eq. 12) against the answer length, and the share of positions Prune-OPD would
  drop (R <= eps: never trained on, and never generated once the budget follows E);
- a gamma suggestion: the median overlap of the first ``CALIBRATION_TOKENS`` positions, where the
  prefix is still the prompt's (what ``demo --real``'s calibrated arm uses);
- a verdict, from two measured properties of the pair at the gamma used:

  drop share  < ``DROP_MIN``: E covers nearly the whole answer, so Algorithm 1's budget grows from M_0
              to the answers' length, and from there Prune-OPD trains and costs what OPD does:
              *little to prune, use OPD* (the rounds before that are cheaper: truncation at M_t);
  late/early  the bad-event rate of the last third of each answer over that of its first third.
              >= ``LATE_RATIO``: *drift is late, pruning can pay* (E differs by answer, so the
              budget follows it where fixed truncation cannot); below: *drift is uniform, use OPD or
              truncation* (E is about the same fraction of every answer: truncation at E does the same
              for less).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opdcache.errors import OpdcacheError
from opdcache.query import refresh_duckdb_file, run_sql
from opdcache.rundir import RunDir, atomic_write_bytes

CALIBRATION_TOKENS = 32
CALIBRATION_QUANTILE = 0.5
DROP_MIN = 0.1
LATE_RATIO = 1.5
PAPER_GAMMA = 0.7
VERDICTS = {
    "little": "little to prune: E covers nearly every answer, so Prune-OPD's budget grows to the answers' "
    "length and then costs what OPD does (use OPD)",
    "late": "drift is late, pruning can pay",
    "uniform": "drift is uniform, use OPD or truncation",
}


def calibrated_gamma(run: RunDir | Path, variant: str | None = None, r: int = 0) -> float:
    """The ``CALIBRATION_QUANTILE`` quantile of the top-k overlap at the first ``CALIBRATION_TOKENS``
    response positions of round ``r`` (of ``variant``, default the first scored one)."""
    which = f"'{variant}'" if variant else "(SELECT min(variant) FROM tokens)"
    row = run_sql(
        run,
        f"SELECT quantile_cont(overlap, {CALIBRATION_QUANTILE}), count(*) FROM tokens "
        f"WHERE round = {r} AND variant = {which} AND pos < {CALIBRATION_TOKENS}",
    ).fetchall()[0]
    if row[0] is None:
        raise OpdcacheError(
            f"{Path(getattr(run, 'root', run))}: no scored round-{r} positions to calibrate gamma from"
        )
    return float(row[0])


@dataclass(frozen=True)
class VariantView:
    """One scoring of the probe's samples: what Prune-OPD would do at this gamma."""

    gamma: float
    w_drop: float
    bad_rate: float
    bad_early: float  # bad-event rate over the first third of each answer's positions
    bad_late: float  # over the last third
    late_ratio: float  # bad_late / bad_early (inf when bad_early is 0 and bad_late is not)
    mean_e: float
    drop_share: float  # positions with R <= eps, over all positions


@dataclass(frozen=True)
class ProbeResult:
    out: str
    teacher: str
    student: str
    responses: int
    mean_length: float
    stop_rate: float
    suggested_gamma: float
    paper: VariantView
    used: VariantView
    verdict: str
    verdict_key: str
    bands: list[dict[str, float]]  # per depth band: start, responses reaching it, overlap, bad rate
    seconds: float


def variant_view(run: RunDir, variant: str, gamma: float, w_drop: float) -> VariantView:
    """The probe's figures of one scored variant (the run's ``tokens`` and ``scores`` views, round 0)."""
    early, late, total = run_sql(
        run,
        "WITH t AS (SELECT pos, bad, count(*) OVER (PARTITION BY prompt_id, sample) AS n FROM tokens "
        f"WHERE round = 0 AND variant = '{variant}') "
        "SELECT avg(bad::INTEGER) FILTER (WHERE 3 * pos < n), avg(bad::INTEGER) FILTER (WHERE 3 * pos >= 2 * n), "
        "avg(bad::INTEGER) FROM t",
    ).fetchall()[0]
    mean_e, kept, positions = run_sql(
        run,
        "SELECT avg(effective_len), sum(effective_len), sum(len(reliability)) FROM scores "
        f"WHERE round = 0 AND variant = '{variant}'",
    ).fetchall()[0]
    early, late = float(early or 0.0), float(late or 0.0)
    ratio = late / early if early > 0 else (float("inf") if late > 0 else 1.0)
    return VariantView(
        gamma,
        w_drop,
        float(total or 0.0),
        early,
        late,
        ratio,
        float(mean_e or 0.0),
        1 - kept / max(positions, 1),
    )


def verdict_of(view: VariantView) -> str:
    """The key of ``VERDICTS`` for one variant's figures (module docstring)."""
    if view.drop_share < DROP_MIN:
        return "little"
    return "late" if view.late_ratio >= LATE_RATIO else "uniform"


def depth_bands(run: RunDir, variant: str, band: int) -> list[dict[str, float]]:
    rows = run_sql(
        run,
        f"SELECT (pos // {band}) * {band} AS start, count(DISTINCT (prompt_id, sample)), avg(overlap), "
        f"avg(bad::INTEGER) FROM tokens WHERE round = 0 AND variant = '{variant}' GROUP BY start ORDER BY start",
    ).fetchall()
    return [
        {"start": int(s), "responses": int(n), "overlap": float(o), "bad_rate": float(b)}
        for s, n, o, b in rows
    ]


def probe_overrides(
    teacher: str,
    student: str,
    data: str,
    n: int,
    max_tokens: int,
    chat: bool,
    template: str | None,
    seed: int,
) -> list[str]:
    """The probe run's config: one round of ``n`` prompts x 1 sample at a fixed budget."""
    sets = [
        f"models.teacher={teacher}",
        f"models.student={student}",
        f"data.prompts={data}",
        f"data.chat_template={str(chat).lower()}",
        "rollout.n_samples=1",
        f"rollout.prompts_per_round={n}",
        f"rollout.part_size={n}",
        f"rollout.seed={seed}",
        f"budget.initial={max_tokens}",
        f"budget.min={max_tokens}",
        f"budget.max={max_tokens}",
        "score.variant=probe",
        "eval.data=",
    ]
    if template is not None:
        sets.append(f"data.template={json.dumps(template)}")
    return sets


def run_probe(
    out: str | Path,
    teacher: str,
    student: str,
    data: str | Path,
    n: int = 64,
    max_tokens: int = 256,
    gamma: float | None = None,
    w_drop: float | None = None,
    chat: bool = False,
    template: str | None = None,
    seed: int = 0,
    band: int = 32,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> ProbeResult:
    """The probe (module docstring); OUT is created as a run, or an earlier probe of the same settings
    is completed (its stages are skipped when done)."""
    from opdcache.loop import start_run
    from opdcache.rollout.stage import rollout_round
    from opdcache.score.stage import score_run
    from opdcache.teacher.stage import teacher_round

    t0 = time.perf_counter()
    run = RunDir(out)
    sets = probe_overrides(teacher, student, str(data), n, max_tokens, chat, template, seed) + list(
        overrides or []
    )
    if w_drop is not None:
        sets.append(f"score.w_drop={w_drop}")
    cfg = start_run(config, run, sets)
    rollout_round(run, 0, cfg, max_tokens, progress)
    teacher_round(run, 0, cfg, progress)
    spec = cfg.score.spec
    score_run(run, "paper", spec.replace(gamma=PAPER_GAMMA), [0], progress=progress)
    suggested = calibrated_gamma(run, "paper")
    used = suggested if gamma is None else gamma
    score_run(run, "probe", spec.replace(gamma=used), [0], progress=progress)
    refresh_duckdb_file(run)
    length, stop, responses = run_sql(
        run,
        "SELECT avg(response_len), avg((finish_reason = 'stop')::INTEGER), count(*) FROM rollouts WHERE round = 0",
    ).fetchall()[0]
    paper = variant_view(run, "paper", PAPER_GAMMA, spec.w_drop)
    view = variant_view(run, "probe", used, spec.w_drop)
    key = verdict_of(view)
    res = ProbeResult(
        str(run.root),
        teacher,
        student,
        int(responses),
        float(length),
        float(stop),
        suggested,
        paper,
        view,
        VERDICTS[key],
        key,
        depth_bands(run, "probe", band),
        time.perf_counter() - t0,
    )
    write_probe(run, res)
    return res


def probe_markdown(res: ProbeResult) -> str:
    f = lambda v: "inf" if v == float("inf") else f"{v:.2f}"  # noqa: E731
    lines = [
        f"# opdcache probe: {res.student} taught by {res.teacher}",
        "",
        f"{res.responses} student samples, mean length {res.mean_length:.0f} tokens, stop rate {res.stop_rate:.2f}; "
        f"suggested gamma {res.suggested_gamma:.3f} (median overlap of the first {CALIBRATION_TOKENS} positions).",
        "",
        "| gamma | w_drop | bad rate | first third | last third | late / early | mean E | E / length | dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in (("paper", res.paper), ("used", res.used)):
        lines.append(
            f"| {v.gamma:.3f} ({name}) | {v.w_drop:g} | {v.bad_rate:.3f} | {v.bad_early:.3f} | {v.bad_late:.3f} "
            f"| {f(v.late_ratio)} | {v.mean_e:.0f} | {v.mean_e / max(res.mean_length, 1e-9):.2f} | {v.drop_share:.2f} |"
        )
    lines += ["", "| depth band | responses | overlap | bad rate |", "|---|---|---|---|"]
    lines += [
        f"| {b['start']}- | {b['responses']} | {b['overlap']:.3f} | {b['bad_rate']:.3f} |" for b in res.bands
    ]
    lines += ["", f"**Verdict** (gamma {res.used.gamma:.3f}): {res.verdict}.", ""]
    return "\n".join(lines)


def write_probe(run: RunDir, res: ProbeResult) -> Path:
    """OUT/probe/probe.md, probe.json and probe.png (overlap and bad rate by depth; E against length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = run.root / "probe"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / "probe.md", probe_markdown(res).encode())
    atomic_write_bytes(d / "probe.json", json.dumps(asdict(res), indent=1).encode())
    el = run_sql(
        run,
        "SELECT len(reliability), effective_len FROM scores WHERE round = 0 AND variant = 'probe'",
    ).fetchall()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [x["start"] for x in res.bands]
    a.plot(xs, [x["overlap"] for x in res.bands], marker="o", label="top-k overlap")
    a.plot(xs, [x["bad_rate"] for x in res.bands], marker="s", label=f"bad rate (gamma {res.used.gamma:.2f})")
    a.set_xlabel("response position (band start)")
    a.set_ylim(0, 1)
    a.legend()
    a.set_title("overlap and bad events by depth")
    b.scatter([x for x, _ in el], [e for _, e in el], s=10)
    top = max([x for x, _ in el], default=1)
    b.plot([0, top], [0, top], color="grey", lw=0.8)
    b.set_xlabel("answer length (tokens)")
    b.set_ylabel("effective length E")
    b.set_title(f"E vs length: {res.used.drop_share:.0%} of positions dropped")
    fig.suptitle(res.verdict)
    fig.tight_layout()
    tmp = d / ".probe.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(d / "probe.png")
    return d


def describe_probe(res: ProbeResult) -> str:
    return probe_markdown(res) + f"\nwrote {Path(res.out) / 'probe'} ({res.seconds:.0f} s)"
