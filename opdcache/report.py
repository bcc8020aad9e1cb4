"""Markdown + PNG report of one or more runs, every figure computed by a SQL file in ``analysis/``.

    opdcache report RUN [RUN ...] --out DIR [--band-scale 1000] [--bucket 256]

Views (paper): accuracy against wall time per run (Fig. 1/4), mean weight L by position every few
rounds (Fig. 8), effective length and budget M_t per round (Fig. 6), overlap by depth band per round
(Fig. 7), and the gamma sweep over the run's score-only replays (Table 4). Each table is also
written as CSV next to the plots; edit a query in ``analysis/`` and rerun to change a figure.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdcache.errors import OpdcacheError
from opdcache.query import run_sql
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
    rows = rel.fetchall()
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


def _plot_lines(ax: Any, xs: list, ys: list, label: str, marker: str = "o") -> None:
    ax.plot(xs, ys, marker=marker, markersize=3, label=label)


def make_report(
    runs: list[str | Path],
    out: str | Path,
    band_scale: int = 1000,
    bucket: int = 256,
    every: int = 2,
    sql_dir: str | Path | None = None,
) -> Path:
    """Write ``out/report.md``, ``out/*.png`` and ``out/*.csv`` for ``runs``; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sqld = Path(sql_dir) if sql_dir else ANALYSIS
    roots = [RunDir(r).require().root for r in runs]
    labels = [run_label(r) for r in roots]
    outd = Path(out)
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for lb in labels:
        t = acc.where(run=lb)
        if t.rows:
            _plot_lines(ax, [s / 60 for s in t.col("wall_seconds")], t.col("accuracy"), lb)
    ax.set(xlabel="training wall time (min)", ylabel="Avg@n accuracy", title="Accuracy vs wall time")
    ax.legend(fontsize=7)
    figures.append(("Accuracy against wall time", save(fig, "accuracy_vs_time"), acc))

    fig, ax = plt.subplots(figsize=(6, 4))
    for lb in labels:
        t = bud.where(run=lb)
        if t.rows:
            line = ax.plot(t.col("round"), t.col("max_tokens"), drawstyle="steps-post", label=f"{lb} M_t")[0]
            ax.plot(
                t.col("round"),
                t.col("effective_len_mean"),
                "--",
                marker="o",
                markersize=3,
                color=line.get_color(),
                label=f"{lb} mean E",
            )
    ax.set(xlabel="round", ylabel="tokens", title="Budget M_t and mean effective length")
    ax.legend(fontsize=6)
    figures.append(("Effective length and budget per round", save(fig, "budget"), bud))

    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.5), squeeze=False)
    for ax, lb in zip(axes[0], labels, strict=True):
        t = wts.where(run=lb)
        for rnd in sorted(set(t.col("round")))[::every]:
            tr = t.where(round=rnd)
            _plot_lines(ax, tr.col("pos_start"), tr.col("mean_weight"), f"round {rnd}", "")
        ax.set(xlabel="response position", ylabel="mean L", title=lb, ylim=(0, 1.6))
        ax.legend(fontsize=6)
    figures.append(("Mean weight L by position", save(fig, "weight_by_position"), wts))

    if ovl.rows:
        ov_labels = sorted(set(ovl.col("run")), key=labels.index)
        fig, axes = plt.subplots(1, len(ov_labels), figsize=(4 * len(ov_labels), 3.5), squeeze=False)
        for ax, lb in zip(axes[0], ov_labels, strict=True):
            t = ovl.where(run=lb)
            for rnd in sorted(set(t.col("round")))[::every]:
                tr = t.where(round=rnd)
                _plot_lines(ax, tr.col("band_start"), tr.col("mean_overlap"), f"round {rnd}")
            ax.set(
                xlabel=f"response position (bands of {band_scale} tokens)",
                ylabel="mean overlap",
                title=lb,
                ylim=(0, 1),
            )
            ax.legend(fontsize=6)
        figures.append(("Overlap by depth band", save(fig, "overlap_by_depth"), ovl))

    if sweep.rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lb in labels:
            t = sweep.where(run=lb)
            for g in sorted(set(t.col("gamma"))):
                tg = t.where(gamma=g)
                _plot_lines(ax, tg.col("round"), tg.col("next_max_tokens"), f"{lb} gamma={g:g}")
        ax.set(xlabel="round", ylabel="next budget M_{t+1}", title="Gamma sweep (score-only replays)")
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
