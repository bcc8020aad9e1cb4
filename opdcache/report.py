"""Markdown + PNG report of one or more runs, every figure computed by a SQL file in ``analysis/``.

    opdcache report RUN [RUN ...] --out DIR [--band-scale 1000] [--bucket 256]

Views (paper): accuracy against wall time per run (Fig. 1/4), mean weight L by position in the first
and the last round (Fig. 8), effective length and budget M_t per round (Fig. 6), overlap by depth band per round
(Fig. 7), and the gamma sweep over the run's score-only replays (Table 4). Each table is also
written as CSV next to the plots; edit a query in ``analysis/`` and rerun to change a figure.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from opdcache.errors import OpdcacheError
from opdcache.query import read_error, run_sql
from opdcache.rundir import RunDir, atomic_write_bytes

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


@dataclass
class Table:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def col(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def where(self, **eq: Any) -> Table:
        idx = [self.columns.index(k) for k in eq]
        keep = [r for r in self.rows if all(r[i] == v for i, v in zip(idx, eq.values(), strict=True))]
        return Table(self.columns, keep)

    def markdown(self, max_rows: int = 60) -> str:
        def fmt(v: Any) -> str:
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in self.rows[:max_rows]]
        if len(self.rows) > max_rows:
            lines.append(f"\n({len(self.rows) - max_rows} more rows in the CSV)")
        return "\n".join(lines)

    def csv(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue().encode()


def sql_table(
    root: RunDir | Path,
    name: str,
    sql_dir: Path,
    params: dict[str, str] | None = None,
    label: str | None = None,
) -> Table:
    """Run ``sql_dir/name.sql`` on one run; ``label`` prepends a ``run`` column."""
    path = sql_dir / f"{name}.sql"
    if not path.exists():
        raise OpdcacheError(f"{path}: analysis query not found (--sql-dir points at the analysis/ folder)")
    rel = run_sql(root, path.read_text(), params)
    if rel is None:
        raise OpdcacheError(f"{path}: no SQL statement")
    try:
        rows = rel.fetchall()
    except duckdb.Error as e:
        raise read_error(root, e) from e
    cols = list(rel.columns)
    if label is not None:
        cols, rows = ["run", *cols], [(label, *r) for r in rows]
    return Table(cols, rows)


def concat(tables: list[Table]) -> Table:
    if not tables:
        return Table([], [])
    return Table(tables[0].columns, [r for t in tables for r in t.rows])


def run_label(root: Path) -> str:
    from opdcache.config import read_run_config

    cfg = read_run_config(root)
    arm = cfg.arm.name if cfg is not None else "?"
    return root.name if arm in root.name else f"{root.name} ({arm})"


RUN_NAME = re.compile(r"^(?P<pair>[A-Za-z0-9]+)-(?P<arm>.+)-s(?P<seed>\d+)$")
ARM_ORDER = (
    "opd",
    "prune",
    "truncate",
    "prune-inflight",
    "prune-topp",
    "random",
    "iw-opd",
    "prune-grpo",
    "grpo",
)
ARM_NAMES = {  # the paper's terms in legends
    "opd": "OPD",
    "prune": "Prune-OPD",
    "truncate": "truncation",
    "prune-inflight": "Prune-OPD in flight",
    "prune-topp": "Prune-OPD top-p",
    "random": "random pruning",
    "iw-opd": "IW-OPD",
    "prune-grpo": "Prune-OPD + GRPO",
    "grpo": "GRPO alone",
}


@dataclass(frozen=True)
class RunId:
    """Where a run sits in the figures: a panel per ``pair``, a colour per ``arm``, seeds averaged.
    Runs named ``<pair>-<arm>-s<seed>`` (the demo's) are grouped; any other run is its own arm."""

    label: str
    pair: str
    arm: str
    seed: int
    variant: str  # whose weights L train the run (the random arm scores two)


def run_id(root: Path, label: str) -> RunId:
    from opdcache.arms import plan
    from opdcache.config import read_run_config

    cfg = read_run_config(root)
    variant = plan(cfg).train_variant if cfg is not None else ""
    m = RUN_NAME.match(root.name)
    if m:
        return RunId(label, m["pair"], m["arm"], int(m["seed"]), variant)
    return RunId(label, "", label, 0, variant)


def arm_colours(arms: list[str]) -> dict[str, Any]:
    """One colour per arm, the same in every figure (known arms keep their place in the palette)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    known = [a for a in ARM_ORDER if a in arms] + sorted(a for a in arms if a not in ARM_ORDER)
    slot = {a: ARM_ORDER.index(a) if a in ARM_ORDER else len(ARM_ORDER) + i for i, a in enumerate(known)}
    return {a: palette[slot[a] % len(palette)] for a in known}


def seed_mean(points: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """Per index over the seeds' (x, y) series (cut to the shortest): mean x, mean y, s.d. of y."""
    import numpy as np

    n = min(len(p) for p in points)
    a = np.array([p[:n] for p in points], dtype=float)  # seeds x n x 2
    sd = a[:, :, 1].std(axis=0, ddof=1) if len(points) > 1 else np.zeros(n)
    return a[:, :, 0].mean(axis=0).tolist(), a[:, :, 1].mean(axis=0).tolist(), sd.tolist()


def make_report(
    runs: list[str | Path],
    out: str | Path,
    band_scale: int = 1000,
    bucket: int = 256,
    sql_dir: str | Path | None = None,
) -> Path:
    """Write ``out/report.md``, ``out/*.png`` and ``out/*.csv`` for ``runs``; returns the Markdown path.
    A report refused (a damaged run, a missing query) leaves no ``out`` folder it made."""
    sqld = Path(sql_dir) if sql_dir else ANALYSIS
    if not sqld.is_dir():
        raise OpdcacheError(f"--sql-dir {sqld}: no such folder; expected the analysis/ queries")
    outd = Path(out)
    made = not outd.exists()
    try:
        return _make_report(runs, outd, band_scale, bucket, sqld)
    except BaseException:
        if made and outd.is_dir() and not any(outd.iterdir()):
            outd.rmdir()
        raise


def _make_report(runs: list[str | Path], outd: Path, band_scale: int, bucket: int, sqld: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roots = [RunDir(r).require().root for r in runs]
    labels = [run_label(r) for r in roots]
    outd.mkdir(parents=True, exist_ok=True)

    acc = concat(
        [sql_table(r, "accuracy_vs_time", sqld, label=lb) for r, lb in zip(roots, labels, strict=True)]
    )
    bud = concat(
        [sql_table(r, "budget_per_round", sqld, label=lb) for r, lb in zip(roots, labels, strict=True)]
    )
    wts = concat(
        [
            sql_table(r, "weight_by_position", sqld, {"bucket": str(bucket)}, lb)
            for r, lb in zip(roots, labels, strict=True)
        ]
    )
    ovl = concat(
        [
            sql_table(r, "overlap_by_depth", sqld, {"band_scale": str(band_scale)}, lb)
            for r, lb in zip(roots, labels, strict=True)
            if run_sql(r, "SELECT count(*) FROM scores WHERE overlap IS NOT NULL").fetchall()[0][0]
        ]
    )
    dist = concat(
        [sql_table(r, "distill_vs_time", sqld, label=lb) for r, lb in zip(roots, labels, strict=True)]
    )
    evov = concat(
        [sql_table(r, "eval_overlap_by_depth", sqld, label=lb) for r, lb in zip(roots, labels, strict=True)]
    )
    sweep = concat(
        [
            sql_table(rep, "gamma_sweep", sqld, label=lb)
            for r, lb in zip(roots, labels, strict=True)
            for rep in RunDir(r).replay_runs()
            if rep.variants() and not rep.rounds(rep.checkpoints)
        ]
    )

    figures: list[tuple[str, str, Table]] = []

    def save(fig: Any, name: str) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(outd / f"{name}.png", buf.getvalue())
        return f"{name}.png"

    ids = [run_id(r, lb) for r, lb in zip(roots, labels, strict=True)]
    pairs = list(dict.fromkeys(i.pair for i in ids))
    colour = arm_colours([i.arm for i in ids])

    def groups(pair: str) -> dict[str, list[RunId]]:
        """The pair's runs by arm, in the palette's order."""
        out: dict[str, list[RunId]] = {}
        for arm in colour:
            if runs_ := [i for i in ids if i.pair == pair and i.arm == arm]:
                out[arm] = runs_
        return out

    def panels(n: int, height: float = 3.4) -> tuple[Any, list[Any]]:
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, height), squeeze=False)
        return fig, list(axes[0])

    def title(pair: str, what: str) -> str:
        return f"{pair} pair: {what}" if pair else what

    def name(arm: str) -> str:
        return ARM_NAMES.get(arm, arm)

    def seeds(table: Table, runs_: list[RunId], x: str, y: str, key: dict[str, Any] | None = None) -> list:
        return [
            list(zip(t.col(x), t.col(y), strict=True))
            for i in runs_
            if (t := table.where(run=i.label, **(key or {}))).rows
        ]

    # accuracy against wall time: mean over seeds with +- s.d. bars, each seed faint
    fig, axes = panels(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for arm, runs_ in groups(pair).items():
            series = seeds(acc, runs_, "wall_seconds", "accuracy")
            if not series:
                continue
            for s_ in series if len(series) > 1 else []:
                ax.plot([x / 60 for x, _ in s_], [y for _, y in s_], color=colour[arm], alpha=0.25, lw=0.8)
            xs, ys, sd = seed_mean(series)
            ax.errorbar([x / 60 for x in xs], ys, yerr=sd, color=colour[arm], marker="o", ms=3, capsize=2,
                        label=name(arm))  # fmt: skip
        ax.set(
            xlabel="training wall time (min)", ylabel="Avg@n accuracy", title=title(pair, "accuracy vs time")
        )
        ax.legend(fontsize=7)
    figures.append(("Accuracy against wall time", save(fig, "accuracy_vs_time"), acc))

    # distillation metrics (eval.teacher): held-out top-k KL against wall time, and by depth
    if dist.rows:
        d_pairs = list(dict.fromkeys(i.pair for i in ids if dist.where(run=i.label).rows))
        fig, axes = panels(len(d_pairs))
        for ax, pair in zip(axes, d_pairs, strict=True):
            for arm, runs_ in groups(pair).items():
                for metric, style, what in (("topk_kl", "-", "top-k"), ("full_kl", "--", "full")):
                    rows_ = Table(
                        dist.columns, [r for r in dist.rows if r[dist.columns.index(metric)] is not None]
                    )
                    if series := seeds(rows_, runs_, "wall_seconds", metric):
                        xs, ys, sd = seed_mean(series)
                        ax.errorbar([x / 60 for x in xs], ys, yerr=sd, color=colour[arm], marker="o", ms=3,
                                    capsize=2, ls=style, label=f"{name(arm)} {what} KL")  # fmt: skip
            ax.set(xlabel="training wall time (min)", ylabel="held-out reverse KL to the teacher",
                   title=title(pair, "distillation vs time"))  # fmt: skip
            ax.legend(fontsize=7)
        figures.append(
            ("Held-out top-k KL to the teacher against wall time", save(fig, "distill_vs_time"), dist)
        )
    if evov.rows:
        e_pairs = list(dict.fromkeys(i.pair for i in ids if evov.where(run=i.label).rows))
        fig, axes = panels(len(e_pairs))
        for ax, pair in zip(axes, e_pairs, strict=True):
            for arm, runs_ in groups(pair).items():
                if not (rounds := sorted(set(evov.where(run=runs_[0].label).col("round")))):
                    continue
                for rnd, style in [(rounds[-1], "-"), (rounds[0], ":")][: len(rounds)]:
                    series = seeds(evov, runs_, "band_start", "mean_overlap", {"round": rnd})
                    xs, ys, _ = seed_mean(series)
                    ax.plot(
                        xs, ys, style, marker="o", ms=3, color=colour[arm], label=f"{name(arm)} round {rnd}"
                    )
            ax.set(xlabel="response position (band start)", ylabel="mean top-k overlap", ylim=(0, 1),
                   title=title(pair, "held-out overlap by depth"))  # fmt: skip
            ax.legend(fontsize=6)
        figures.append(
            ("Held-out overlap by depth (student samples)", save(fig, "eval_overlap_by_depth"), evov)
        )

    # budget M_t (steps) and mean effective length E (dashed), mean over seeds
    fig, axes = panels(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for arm, runs_ in groups(pair).items():
            m = seeds(bud, runs_, "round", "max_tokens")
            e = seeds(bud, runs_, "round", "effective_len_mean")
            if not m:
                continue
            xs, ys, _ = seed_mean(m)
            ax.plot(xs, ys, drawstyle="steps-post", color=colour[arm], label=f"{name(arm)} M_t")
            xs, ys, _ = seed_mean(e)
            ax.plot(xs, ys, "--", marker="o", ms=3, color=colour[arm], label=f"{name(arm)} mean E")
        ax.set(xlabel="round t", ylabel="tokens", title=title(pair, "budget M_t and effective length E"))
        ax.legend(fontsize=6)
    figures.append(("Effective length and budget per round", save(fig, "budget"), bud))

    # mean weight L_tau by position, last round (solid) and first (dotted), only arms where L varies
    varying = {
        (i.pair, i.arm)
        for i in ids
        if len({round(w, 6) for w in wts.where(run=i.label, variant=i.variant).col("mean_weight")}) > 1
    }
    wt_pairs = [p for p in pairs if any(q == p for q, _ in varying)]
    if wt_pairs:
        fig, axes = panels(len(wt_pairs))
        for ax, pair in zip(axes, wt_pairs, strict=True):
            for arm, runs_ in groups(pair).items():
                if (pair, arm) not in varying:
                    continue
                rounds = sorted(set(wts.where(run=runs_[0].label).col("round")))
                for rnd, style in [(rounds[-1], "-"), (rounds[0], ":")][: len(rounds)]:
                    key = {"round": rnd, "variant": runs_[0].variant}
                    series = seeds(wts, runs_, "pos_start", "mean_weight", key)
                    xs, ys, _ = seed_mean(series)
                    ax.plot(xs, ys, style, color=colour[arm], label=f"{name(arm)} round {rnd}")
            ax.set(xlabel="response position tau", ylabel="mean L_tau", ylim=(0, 1.6),
                   title=title(pair, "weight L by position"))  # fmt: skip
            ax.legend(fontsize=6)
        figures.append(("Mean weight L by position", save(fig, "weight_by_position"), wts))

    # overlap by depth: first round (dotted) and last (solid) per arm
    if ovl.rows:
        ov_ids = [i for i in ids if ovl.where(run=i.label).rows]
        ov_pairs = list(dict.fromkeys(i.pair for i in ov_ids))
        fig, axes = panels(len(ov_pairs))
        for ax, pair in zip(axes, ov_pairs, strict=True):
            for arm, runs_ in groups(pair).items():
                runs_ = [i for i in runs_ if i in ov_ids]
                if not runs_:
                    continue
                rounds = sorted(set(ovl.where(run=runs_[0].label).col("round")))
                for rnd, style in [(rounds[-1], "-"), (rounds[0], ":")][: len(rounds)]:
                    series = seeds(ovl, runs_, "band_start", "mean_overlap", {"round": rnd})
                    xs, ys, _ = seed_mean(series)
                    ax.plot(
                        xs, ys, style, marker="o", ms=3, color=colour[arm], label=f"{name(arm)} round {rnd}"
                    )
            ax.set(xlabel=f"response position (bands of {band_scale} tokens)", ylabel="mean overlap O",
                   ylim=(0, 1), title=title(pair, "top-k overlap by depth"))  # fmt: skip
            ax.legend(fontsize=6)
        figures.append(("Overlap by depth band", save(fig, "overlap_by_depth"), ovl))

    if sweep.rows:
        sw_ids = [i for i in ids if sweep.where(run=i.label).rows]
        sw_pairs = list(dict.fromkeys(i.pair for i in sw_ids))
        fig, axes = panels(len(sw_pairs))
        gammas = sorted(set(sweep.col("gamma")))
        for ax, pair in zip(axes, sw_pairs, strict=True):
            for arm, runs_ in groups(pair).items():
                runs_ = [i for i in runs_ if i in sw_ids]
                for g, style in zip(gammas, ("-", "--", ":", "-.") * 4, strict=False):
                    if series := seeds(sweep, runs_, "round", "mean_effective_len", {"gamma": g}):
                        xs, ys, _ = seed_mean(series)
                        ax.plot(
                            xs,
                            ys,
                            style,
                            marker="o",
                            ms=3,
                            color=colour[arm],
                            label=f"{name(arm)} gamma={g:g}",
                        )
            ax.set(xlabel="round t", ylabel="mean E", title=title(pair, "gamma sweep (score-only replays)"))
            ax.legend(fontsize=6)
        figures.append(("Gamma sweep", save(fig, "gamma_sweep"), sweep))

    md = ["# opdcache report", "", "Runs: " + ", ".join(f"`{r}`" for r in roots), ""]
    for title, png, table in figures:
        stem = png.removesuffix(".png")
        atomic_write_bytes(outd / f"{stem}.csv", table.csv())
        md += [
            f"## {title}",
            "",
            f"![{title}]({png})",
            "",
            f"Query: `analysis/{_query_for(stem)}.sql`, data: [{stem}.csv]({stem}.csv)",
            "",
            table.markdown(),
            "",
        ]
    path = outd / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode())
    return path


def _query_for(stem: str) -> str:
    return {"budget": "budget_per_round"}.get(stem, stem)
