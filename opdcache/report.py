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
    roots = [RunDir(r).require().root for r in runs]
    labels = [run_label(r) for r in roots]
    outd.mkdir(parents=True, exist_ok=True)
    t = _load_tables(roots, labels, sqld, band_scale, bucket)
    plot = _Plotter([run_id(r, lb) for r, lb in zip(roots, labels, strict=True)], outd)
    figures = [
        _fig_accuracy(plot, t["acc"]),
        _fig_distill(plot, t["dist"]),
        _fig_eval_overlap(plot, t["evov"]),
        _fig_budget(plot, t["bud"]),
        _fig_weights(plot, t["wts"]),
        _fig_overlap(plot, t["ovl"], band_scale),
        _fig_sweep(plot, t["sweep"]),
    ]
    return _write_markdown([f for f in figures if f is not None], roots, outd)


def _load_tables(
    roots: list[Path], labels: list[str], sqld: Path, band_scale: int, bucket: int
) -> dict[str, Table]:
    """Every figure's table, one ``analysis/*.sql`` query per run (``run`` column first)."""

    def each(query: str, params: dict[str, str] | None = None, keep: Any = None) -> Table:
        return concat(
            [
                sql_table(r, query, sqld, params, lb)
                for r, lb in zip(roots, labels, strict=True)
                if keep is None or keep(r)
            ]
        )

    def overlap_scored(r: Path) -> bool:
        return run_sql(r, "SELECT count(*) FROM scores WHERE overlap IS NOT NULL").fetchall()[0][0] > 0

    sweep = concat(
        [
            sql_table(rep, "gamma_sweep", sqld, label=lb)
            for r, lb in zip(roots, labels, strict=True)
            for rep in RunDir(r).replay_runs()
            if rep.variants() and not rep.rounds(rep.checkpoints)
        ]
    )
    return {
        "acc": each("accuracy_vs_time"),
        "bud": each("budget_per_round"),
        "wts": each("weight_by_position", {"bucket": str(bucket)}),
        "ovl": each("overlap_by_depth", {"band_scale": str(band_scale)}, overlap_scored),
        "dist": each("distill_vs_time"),
        "evov": each("eval_overlap_by_depth"),
        "sweep": sweep,
    }


Figure = tuple[str, str, Table]  # (title, png name, its table)


class _Plotter:
    """What every figure shares: the runs (a panel per pair, a colour per arm), seed means, saving."""

    def __init__(self, ids: list[RunId], outd: Path) -> None:
        self.ids, self.outd = ids, outd
        self.pairs = list(dict.fromkeys(i.pair for i in ids))
        self.colour = arm_colours([i.arm for i in ids])

    def save(self, fig: Any, name: str) -> str:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.outd / f"{name}.png", buf.getvalue())
        return f"{name}.png"

    def groups(self, pair: str) -> dict[str, list[RunId]]:
        """The pair's runs by arm, in the palette's order."""
        out: dict[str, list[RunId]] = {}
        for arm in self.colour:
            if runs_ := [i for i in self.ids if i.pair == pair and i.arm == arm]:
                out[arm] = runs_
        return out

    def pairs_in(self, table: Table) -> list[str]:
        return list(dict.fromkeys(i.pair for i in self.ids if table.where(run=i.label).rows))

    @staticmethod
    def panels(n: int, height: float = 3.4) -> tuple[Any, list[Any]]:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, height), squeeze=False)
        return fig, list(axes[0])

    @staticmethod
    def title(pair: str, what: str) -> str:
        return f"{pair} pair: {what}" if pair else what

    @staticmethod
    def name(arm: str) -> str:
        return ARM_NAMES.get(arm, arm)

    @staticmethod
    def seeds(table: Table, runs_: list[RunId], x: str, y: str, key: dict[str, Any] | None = None) -> list:
        return [
            list(zip(t.col(x), t.col(y), strict=True))
            for i in runs_
            if (t := table.where(run=i.label, **(key or {}))).rows
        ]

    def first_last(
        self, ax: Any, table: Table, arm: str, runs_: list[RunId], x: str, y: str, marker: bool, **key: Any
    ) -> None:
        """The arm's last round solid and its first dotted (seed means)."""
        rounds = sorted(set(table.where(run=runs_[0].label).col("round")))
        for rnd, style in [(rounds[-1], "-"), (rounds[0], ":")][: len(rounds)] if rounds else []:
            xs, ys, _ = seed_mean(self.seeds(table, runs_, x, y, {"round": rnd, **key}))
            ax.plot(xs, ys, style, **({"marker": "o", "ms": 3} if marker else {}), color=self.colour[arm],
                    label=f"{self.name(arm)} round {rnd}")  # fmt: skip


def _fig_accuracy(p: _Plotter, acc: Table) -> Figure:
    """Accuracy against wall time: mean over seeds with +- s.d. bars, each seed faint."""
    fig, axes = p.panels(len(p.pairs))
    for ax, pair in zip(axes, p.pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            series = p.seeds(acc, runs_, "wall_seconds", "accuracy")
            if not series:
                continue
            for s_ in series if len(series) > 1 else []:
                ax.plot([x / 60 for x, _ in s_], [y for _, y in s_], color=p.colour[arm], alpha=0.25, lw=0.8)
            xs, ys, sd = seed_mean(series)
            ax.errorbar([x / 60 for x in xs], ys, yerr=sd, color=p.colour[arm], marker="o", ms=3, capsize=2,
                        label=p.name(arm))  # fmt: skip
        ax.set(
            xlabel="training wall time (min)",
            ylabel="Avg@n accuracy",
            title=p.title(pair, "accuracy vs time"),
        )
        ax.legend(fontsize=7)
    return ("Accuracy against wall time", p.save(fig, "accuracy_vs_time"), acc)


def _fig_distill(p: _Plotter, dist: Table) -> Figure | None:
    """Distillation metrics (eval.teacher): held-out top-k and full KL against wall time."""
    if not dist.rows:
        return None
    d_pairs = p.pairs_in(dist)
    fig, axes = p.panels(len(d_pairs))
    for ax, pair in zip(axes, d_pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            for metric, style, what in (("topk_kl", "-", "top-k"), ("full_kl", "--", "full")):
                rows_ = Table(
                    dist.columns, [r for r in dist.rows if r[dist.columns.index(metric)] is not None]
                )
                if series := p.seeds(rows_, runs_, "wall_seconds", metric):
                    xs, ys, sd = seed_mean(series)
                    ax.errorbar([x / 60 for x in xs], ys, yerr=sd, color=p.colour[arm], marker="o", ms=3,
                                capsize=2, ls=style, label=f"{p.name(arm)} {what} KL")  # fmt: skip
        ax.set(xlabel="training wall time (min)", ylabel="held-out reverse KL to the teacher",
               title=p.title(pair, "distillation vs time"))  # fmt: skip
        ax.legend(fontsize=7)
    return ("Held-out top-k KL to the teacher against wall time", p.save(fig, "distill_vs_time"), dist)


def _fig_eval_overlap(p: _Plotter, evov: Table) -> Figure | None:
    """Held-out overlap by depth on the student's own samples, last round solid, first dotted."""
    if not evov.rows:
        return None
    e_pairs = p.pairs_in(evov)
    fig, axes = p.panels(len(e_pairs))
    for ax, pair in zip(axes, e_pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            p.first_last(ax, evov, arm, runs_, "band_start", "mean_overlap", marker=True)
        ax.set(xlabel="response position (band start)", ylabel="mean top-k overlap", ylim=(0, 1),
               title=p.title(pair, "held-out overlap by depth"))  # fmt: skip
        ax.legend(fontsize=6)
    return ("Held-out overlap by depth (student samples)", p.save(fig, "eval_overlap_by_depth"), evov)


def _fig_budget(p: _Plotter, bud: Table) -> Figure:
    """Budget M_t (steps) and mean effective length E (dashed), mean over seeds (Fig. 6)."""
    fig, axes = p.panels(len(p.pairs))
    for ax, pair in zip(axes, p.pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            m = p.seeds(bud, runs_, "round", "max_tokens")
            e = p.seeds(bud, runs_, "round", "effective_len_mean")
            if not m:
                continue
            xs, ys, _ = seed_mean(m)
            ax.plot(xs, ys, drawstyle="steps-post", color=p.colour[arm], label=f"{p.name(arm)} M_t")
            xs, ys, _ = seed_mean(e)
            ax.plot(xs, ys, "--", marker="o", ms=3, color=p.colour[arm], label=f"{p.name(arm)} mean E")
        ax.set(xlabel="round t", ylabel="tokens", title=p.title(pair, "budget M_t and effective length E"))
        ax.legend(fontsize=6)
    return ("Effective length and budget per round", p.save(fig, "budget"), bud)


def _fig_weights(p: _Plotter, wts: Table) -> Figure | None:
    """Mean weight L_tau by position (Fig. 8), last round solid, first dotted, only arms where L varies."""
    varying = {
        (i.pair, i.arm)
        for i in p.ids
        if len({round(w, 6) for w in wts.where(run=i.label, variant=i.variant).col("mean_weight")}) > 1
    }
    wt_pairs = [pair for pair in p.pairs if any(q == pair for q, _ in varying)]
    if not wt_pairs:
        return None
    fig, axes = p.panels(len(wt_pairs))
    for ax, pair in zip(axes, wt_pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            if (pair, arm) in varying:
                p.first_last(ax, wts, arm, runs_, "pos_start", "mean_weight", marker=False,
                             variant=runs_[0].variant)  # fmt: skip
        ax.set(xlabel="response position tau", ylabel="mean L_tau", ylim=(0, 1.6),
               title=p.title(pair, "weight L by position"))  # fmt: skip
        ax.legend(fontsize=6)
    return ("Mean weight L by position", p.save(fig, "weight_by_position"), wts)


def _fig_overlap(p: _Plotter, ovl: Table, band_scale: int) -> Figure | None:
    """Overlap by depth band (Fig. 7): first round dotted, last solid, per arm."""
    if not ovl.rows:
        return None
    ov_ids = [i for i in p.ids if ovl.where(run=i.label).rows]
    ov_pairs = p.pairs_in(ovl)
    fig, axes = p.panels(len(ov_pairs))
    for ax, pair in zip(axes, ov_pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            if runs_ := [i for i in runs_ if i in ov_ids]:
                p.first_last(ax, ovl, arm, runs_, "band_start", "mean_overlap", marker=True)
        ax.set(xlabel=f"response position (bands of {band_scale} tokens)", ylabel="mean overlap O",
               ylim=(0, 1), title=p.title(pair, "top-k overlap by depth"))  # fmt: skip
        ax.legend(fontsize=6)
    return ("Overlap by depth band", p.save(fig, "overlap_by_depth"), ovl)


def _fig_sweep(p: _Plotter, sweep: Table) -> Figure | None:
    """The gamma sweep over the score-only replays (Table 4): mean E per round, a line style per gamma."""
    if not sweep.rows:
        return None
    sw_ids = [i for i in p.ids if sweep.where(run=i.label).rows]
    sw_pairs = p.pairs_in(sweep)
    fig, axes = p.panels(len(sw_pairs))
    gammas = sorted(set(sweep.col("gamma")))
    for ax, pair in zip(axes, sw_pairs, strict=True):
        for arm, runs_ in p.groups(pair).items():
            runs_ = [i for i in runs_ if i in sw_ids]
            for g, style in zip(gammas, ("-", "--", ":", "-.") * 4, strict=False):
                if series := p.seeds(sweep, runs_, "round", "mean_effective_len", {"gamma": g}):
                    xs, ys, _ = seed_mean(series)
                    ax.plot(xs, ys, style, marker="o", ms=3, color=p.colour[arm],
                            label=f"{p.name(arm)} gamma={g:g}")  # fmt: skip
        ax.set(xlabel="round t", ylabel="mean E", title=p.title(pair, "gamma sweep (score-only replays)"))
        ax.legend(fontsize=6)
    return ("Gamma sweep", p.save(fig, "gamma_sweep"), sweep)


def _write_markdown(figures: list[Figure], roots: list[Path], outd: Path) -> Path:
    """report.md: each figure with its query, its CSV (written beside it) and its table."""
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
