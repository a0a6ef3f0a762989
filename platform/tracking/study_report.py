"""A study's report (RESULTS.md and its plots), computed from the MLflow store alone.

`write_report(plan, store, out)` reads the finished trials the plan names (platform/tracking/
study_store.py), computes every cell's mean and 95 % interval over seeds, every claim's comparisons
and verdicts (platform/tracking/statistics.py), and writes the Markdown and PNG plots. It reads
nothing but the plan and the store, sorts everything it reads and draws bootstrap samples from a
fixed seed: the same store gives the same bytes (`selfflow study --report-only`).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from selfflow.components.files import atomic_path, write_text_atomic
from selfflow.platform.errors import ConfigError
from selfflow.platform.tracking import statistics as st
from selfflow.platform.tracking.study_store import StudyStore, TrialRun, metric_name

CLAIM_KINDS = ("better", "no_better", "no_worse", "faster", "scaling")
AT_CHOICES = ("end", "wall")
CLOCKS = ("steps", "wall")


# ---- what the study asks for (built by platform/scale/study.py from the study's gin file) ----------


@dataclass(frozen=True)
class CellRef:
    """`sweep:cell` or `sweep:cell@modality` (a mixture's per-modality metrics)."""

    sweep: str
    cell: str
    modality: str = ""

    @classmethod
    def parse(cls, text: str, where: str) -> "CellRef":
        body, _, modality = str(text).partition("@")
        sweep, sep, cell = body.partition(":")
        if not sep or not sweep or not cell:
            raise ConfigError(f"{where}: a cell is 'sweep:cell' or 'sweep:cell@modality', got {text!r}")
        return cls(sweep.strip(), cell.strip(), modality.strip())

    def __str__(self) -> str:
        return f"{self.sweep}:{self.cell}" + (f"@{self.modality}" if self.modality else "")


def default_mode(metric: str) -> str | None:
    """'min' for distances and losses, 'max' for accuracies and probes, None when unsure."""
    last = metric.split("/")[-1]
    if metric.startswith(("loss/", "loss_by_t/")) or last in ("fd", "fad", "fvd") or last.startswith("fd"):
        return "min"
    if metric.startswith(("probe/", "probe_grid/")) or "acc" in last or last in ("precision", "recall"):
        return "max"
    return None


@dataclass(frozen=True)
class ClaimSpec:
    id: str
    statement: str
    kind: str
    metric: str
    mode: str
    a: str  # a cell ('sweep:cell[@modality]'), or for 'scaling' a series (the cell without its size)
    b: tuple[str, ...]
    at: str = "end"  # end: last value; wall: at the wall time both cells reached
    margin: float = 0.05
    threshold: float = math.nan  # 'faster'
    clock: str = "steps"  # 'faster': steps or wall seconds
    sweep: str = ""  # 'scaling'
    size: str = ""  # 'scaling': the binding that sets the model size
    subtract: str = ""  # 'scaling': fit (metric - this metric), e.g. the data floor of FD

    def __post_init__(self):
        where = f"Study.claims[{self.id!r}]"
        if self.kind not in CLAIM_KINDS:
            raise ConfigError(f"{where}: kind must be one of {CLAIM_KINDS}, got {self.kind!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"{where}: mode must be 'min' or 'max' (cannot infer it for {self.metric!r})")
        if not self.b:
            raise ConfigError(f"{where}: needs 'b' (a cell or a list of cells to compare with)")
        if self.at not in AT_CHOICES or self.clock not in CLOCKS:
            raise ConfigError(f"{where}: 'at' must be one of {AT_CHOICES}, 'clock' one of {CLOCKS}")
        if self.kind == "faster" and not math.isfinite(self.threshold):
            raise ConfigError(f"{where}: kind 'faster' needs a 'threshold'")
        if self.kind == "scaling" and not (self.sweep and self.size):
            raise ConfigError(f"{where}: kind 'scaling' needs 'sweep' and 'size' (the binding that sets the size)")
        if self.kind != "scaling":
            for text in (self.a, *self.b):
                CellRef.parse(text, where)


@dataclass(frozen=True)
class TableSpec:
    title: str
    sweep: str
    metrics: tuple[str, ...] = ()
    probes: str = ""  # 'linear' or 'knn': a block x noise-level table per cell
    modality: str = ""


@dataclass(frozen=True)
class PlotSpec:
    sweep: str
    metrics: tuple[str, ...]
    modality: str = ""


@dataclass(frozen=True)
class PlannedTrial:
    key: str
    sweep: str
    cell: str
    seed: int
    axes: tuple[tuple[str, str], ...]  # the sampled bindings (key, value) without the seed


@dataclass(frozen=True)
class PlannedSweep:
    name: str
    section: str
    cells: tuple[str, ...]
    seeds: tuple[int, ...]
    description: str
    note: str = ""  # e.g. a preset pattern that matched no file


@dataclass(frozen=True)
class ReportPlan:
    study: str
    title: str
    budget: str
    experiment: str
    command: str
    sweeps: tuple[PlannedSweep, ...]
    trials: tuple[PlannedTrial, ...]
    tables: tuple[TableSpec, ...] = ()
    plots: tuple[PlotSpec, ...] = ()
    claims: tuple[ClaimSpec, ...] = ()
    notes: str = ""

    def sweep(self, name: str) -> PlannedSweep | None:
        return next((s for s in self.sweeps if s.name == name), None)


# ---- formatting -------------------------------------------------------------------------------


def num(value: float, digits: int = 4) -> str:
    if value == 0:
        return "0"  # never "-0"
    if value is None or not math.isfinite(value):
        return "-" if value is None or math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def pval(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def cell_text(values: Sequence[float]) -> str:
    mean, half, n = st.cell_summary(values)
    if n == 0:
        return "-"
    if not math.isfinite(half):
        return f"{num(mean)} (n={n})"
    return f"{num(mean)} ± {num(half, 2)} (n={n})"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [row(header), "|" + "|".join("---" for _ in header) + "|", *(row(r) for r in rows)]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


# ---- data of cells --------------------------------------------------------------------------------


@dataclass
class Cells:
    """The finished runs of the plan, by (sweep, cell), and lookups on them."""

    store: StudyStore
    plan: ReportPlan
    by_cell: dict[tuple[str, str], list[TrialRun]] = field(default_factory=dict)

    @classmethod
    def load(cls, store: StudyStore, plan: ReportPlan) -> "Cells":
        planned = {t.key: t for t in plan.trials}
        by_cell: dict[tuple[str, str], list[TrialRun]] = defaultdict(list)
        for run in store.runs():
            trial = planned.get(run.key)
            if trial is not None:
                by_cell[(trial.sweep, trial.cell)].append(run)
        return cls(store, plan, {k: sorted(v, key=lambda r: (int(r.seed or 0), r.run_id)) for k, v in by_cell.items()})

    def runs(self, ref: CellRef) -> list[TrialRun]:
        return self.by_cell.get((ref.sweep, ref.cell), [])

    def unplanned(self, *refs: CellRef) -> str:
        """A note naming the cells the plan does not have (e.g. a preset that does not exist yet)."""
        missing = [str(ref) for ref in refs
                   if (planned := self.plan.sweep(ref.sweep)) is None or ref.cell not in planned.cells]
        return f"not in the study's plan: {', '.join(missing)}" if missing else ""

    def final(self, ref: CellRef, metric: str) -> dict[str, float]:
        out = {}
        for run in self.runs(ref):
            name = metric_name(run.metrics, metric, ref.modality)
            if name is not None:
                out[run.seed] = run.metrics[name]
        return out

    def wall_total(self, run: TrialRun, ref: CellRef, metric: str) -> float:
        curve = self.store.curve(run, metric, ref.modality)
        return curve[-1][0] * self.store.seconds_per_step(run) if curve else math.nan

    def at_wall(self, ref: CellRef, metric: str, budget_s: float) -> dict[str, float]:
        """Per seed: the last evaluation made within `budget_s` seconds of training."""
        out = {}
        for run in self.runs(ref):
            per_step = self.store.seconds_per_step(run)
            done = [v for s, v in self.store.curve(run, metric, ref.modality) if s * per_step <= budget_s * (1 + 1e-9)]
            if done:
                out[run.seed] = done[-1]
        return out


# ---- claims -----------------------------------------------------------------------------------------


@dataclass
class ComparisonRow:
    a: str
    b: str
    cells: list[str]
    diff: st.Difference | None
    verdict: str
    note: str = ""
    p_holm: float = math.nan


@dataclass
class ClaimResult:
    spec: ClaimSpec
    rows: list[ComparisonRow]
    verdict: str
    extra: list[str] = field(default_factory=list)  # more Markdown (fits, plots)
    plots: list[Path] = field(default_factory=list)


def evaluate_ordering(cells: Cells, claim: ClaimSpec) -> ClaimResult:
    a = CellRef.parse(claim.a, claim.id)
    rows = []
    for other in claim.b:
        b = CellRef.parse(other, claim.id)
        note = ""
        if claim.at == "wall":
            totals = [cells.wall_total(r, ref, claim.metric) for ref in (a, b) for r in cells.runs(ref)]
            totals = [t for t in totals if math.isfinite(t)]
            budget = min(totals) if totals else math.nan
            values_a, values_b = cells.at_wall(a, claim.metric, budget), cells.at_wall(b, claim.metric, budget)
            note = f"at {num(budget, 3)} s of training" if math.isfinite(budget) else ""
        else:
            values_a, values_b = cells.final(a, claim.metric), cells.final(b, claim.metric)
        note = cells.unplanned(a, b) or note
        diff = st.compare_cells(values_a, values_b, claim.mode)
        rows.append(ComparisonRow(str(a), str(b), [cell_text(list(values_a.values())), cell_text(list(values_b.values()))],
                                  diff, st.verdict(claim.kind, diff, claim.margin), note))
    return ClaimResult(claim, rows, st.combine([r.verdict for r in rows]))


def reach_times(cells: Cells, ref: CellRef, claim: ClaimSpec) -> dict[str, st.Reach]:
    out = {}
    for run in cells.runs(ref):
        scale = cells.store.seconds_per_step(run) if claim.clock == "wall" else 1.0
        points = [(step * scale, value) for step, value in cells.store.curve(run, claim.metric, ref.modality)]
        reach = st.first_reach(points, claim.threshold, claim.mode)
        if reach is not None and math.isfinite(reach.value):
            out[run.seed] = reach
    return out


def evaluate_faster(cells: Cells, claim: ClaimSpec) -> ClaimResult:
    a = CellRef.parse(claim.a, claim.id)
    unit = "steps" if claim.clock == "steps" else "s"
    rows = []
    for other in claim.b:
        b = CellRef.parse(other, claim.id)
        reach_a, reach_b = reach_times(cells, a, claim), reach_times(cells, b, claim)
        diff, decided = st.faster_verdict(reach_a, reach_b)
        texts = []
        for reach in (reach_a, reach_b):
            hit = sum(r.reached for r in reach.values())
            texts.append(f"{cell_text([r.value for r in reach.values()])} {unit}, reached {hit}/{len(reach)}")
        rows.append(ComparisonRow(str(a), str(b), texts, diff, decided, cells.unplanned(a, b) or
                                  f"{claim.metric} {'<=' if claim.mode == 'min' else '>='} {num(claim.threshold)}"))
    return ClaimResult(claim, rows, st.combine([r.verdict for r in rows]))


def flops_per_sample(store: StudyStore, run: TrialRun) -> float:
    """Training FLOPs of one sample per token, up to a constant: 6 x the per-token weights of the DiT
    blocks, depth x (4 + 2 x mlp_ratio + 6) x hidden^2 (attention, MLP, per-token adaLN)."""
    try:
        width = float(store.param(run, "DiT.hidden_dim") or "nan")
        depth = float(store.param(run, "DiT.depth") or "nan")
        ratio = float(store.param(run, "DiT.mlp_ratio") or "4.0")
    except ValueError:
        return math.nan
    return 6.0 * depth * (4.0 + 2.0 * ratio + 6.0) * width * width


def training_compute(store: StudyStore, run: TrialRun, metric: str, modality: str) -> tuple[float, float]:
    """(compute, metric) at the run's last evaluation; compute = flops_per_sample x batch x steps."""
    curve = store.curve(run, metric, modality)
    try:
        batch = float(store.param(run, "TrainConfig.batch_size") or "nan")
    except ValueError:
        batch = math.nan
    if not curve:
        return math.nan, math.nan
    step, value = curve[-1]
    return flops_per_sample(store, run) * batch * step, value


def evaluate_scaling(cells: Cells, claim: ClaimSpec, plots_dir: Path, link: Callable[[Path], str]) -> ClaimResult:
    planned = [t for t in cells.plan.trials if t.sweep == claim.sweep]
    series_of: dict[str, str] = {}
    for trial in planned:
        series_of[trial.cell] = series_label(trial, claim.size)
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (sweep, cell), runs in sorted(cells.by_cell.items()):
        if sweep != claim.sweep or cell not in series_of:
            continue
        for run in runs:
            compute, value = training_compute(cells.store, run, claim.metric, "")
            if claim.subtract:
                floor = metric_name(run.metrics, claim.subtract)
                value = value - run.metrics[floor] if floor else math.nan
            if math.isfinite(compute) and math.isfinite(value):
                points[series_of[cell]].append((compute, value))
    fits = {name: st.fit_power_law(sorted(pts)) for name, pts in sorted(points.items())}
    what = f"{claim.metric}" + (f" - {claim.subtract}" if claim.subtract else "")
    extra = md_table(
        ["series", "sizes", "runs", "alpha", "95 % CI (bootstrap)", "95 % CI (fit covariance)"],
        [[name, str(f.sizes), str(f.n), num(f.alpha), f"[{num(f.boot_low)}, {num(f.boot_high)}]",
          f"[{num(f.cov_low)}, {num(f.cov_high)}]"] if f else [name, "-", str(len(points[name])), "-", "-", "-"]
         for name, f in fits.items()])
    rows = []
    fit_a = fits.get(claim.a)
    for other in claim.b:
        fit_b = fits.get(other)
        decided = st.scaling_verdict(fit_a, fit_b)
        if fit_a and fit_b:
            delta, low, high = st.exponent_difference(fit_a, fit_b)
            texts = [f"alpha {num(fit_a.alpha)} [{num(fit_a.boot_low)}, {num(fit_a.boot_high)}]",
                     f"alpha {num(fit_b.alpha)} [{num(fit_b.boot_low)}, {num(fit_b.boot_high)}]"]
            note = f"alpha_A - alpha_B = {num(delta)} [{num(low)}, {num(high)}]"
        else:
            texts, note = ["-", "-"], "too few sizes with two or more finished runs to fit"
        rows.append(ComparisonRow(claim.a, other, texts, None, decided, note))
    plot = plot_scaling(points, fits, what, plots_dir / f"scaling_{slug(claim.id)}.png")
    if plot is not None:
        extra += ["", f"![{what} versus training compute]({link(plot)})"]
    extra += ["", f"Fit of log({what}) on log(compute) over the last evaluation of every finished run of sweep "
                  f"`{claim.sweep}`; sizes set by `{claim.size}`. Compute = 6 x depth x (10 + 2 x mlp_ratio) x "
                  f"hidden^2 x batch x steps (FLOPs per token of the blocks' matrix products, forward and "
                  f"backward; tokens per sample are the same at every size, so they only shift the line). An "
                  f"objective's extra forward passes (Self-Flow's teacher) scale the compute of every size alike "
                  f"and so shift its line without changing alpha."]
    return ClaimResult(claim, rows, st.combine([r.verdict for r in rows]), extra, [plot] if plot else [])


def series_label(trial: PlannedTrial, size_key: str) -> str:
    """The cell label without its size axis (the scaling claim's series)."""
    parts = trial.cell.split(" ")
    keys = [k for k, _ in trial.axes]
    if len(parts) == len(keys):
        return " ".join(p for p, k in zip(parts, keys) if k != size_key) or "all"
    return trial.cell


# ---- plots ------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return path


def plot_curves(cells: Cells, sweep: str, metric: str, modality: str, path: Path) -> Path | None:
    """Per cell: the mean over seeds at each step, band = 95 % t interval (steps with >= 2 runs)."""
    lines = []
    for (name, cell), runs in sorted(cells.by_cell.items()):
        if name != sweep:
            continue
        by_step: dict[int, list[float]] = defaultdict(list)
        for run in runs:
            for step, value in cells.store.curve(run, metric, modality):
                if math.isfinite(value):
                    by_step[step].append(value)
        if by_step:
            lines.append((cell, len(runs), by_step))
    if not lines:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 4.2))
    for cell, n, by_step in lines:
        steps = sorted(by_step)
        summaries = [st.cell_summary(by_step[s]) for s in steps]
        means = [m for m, _, _ in summaries]
        line, = axis.plot(steps, means, label=f"{cell} (n={n})", marker="." if len(steps) < 12 else None)
        banded = [(s, m, h) for s, (m, h, k) in zip(steps, summaries) if k >= 2 and math.isfinite(h)]
        if banded:
            axis.fill_between([s for s, _, _ in banded], [m - h for _, m, h in banded], [m + h for _, m, h in banded],
                              color=line.get_color(), alpha=0.15, linewidth=0)
    axis.set_xlabel("training step")
    axis.set_ylabel(metric + (f" ({modality})" if modality else ""))
    axis.set_title(f"{sweep}: {metric}" + (f" ({modality})" if modality else "") + " (mean, 95 % interval over seeds)",
                   fontsize=9)
    values = [v for _, _, b in lines for vs in b.values() for v in vs]
    if metric.endswith("fd") and min(values) > 0 and max(values) > 10 * min(values):  # FD falls by decades
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    return save_figure(figure, path)


def plot_scaling(points: dict[str, list[tuple[float, float]]], fits: dict[str, st.PowerLaw | None], what: str,
                 path: Path) -> Path | None:
    if not any(points.values()):
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name in sorted(points):
        pts = points[name]
        if not pts or any(c <= 0 or v <= 0 for c, v in pts):
            continue
        by_compute: dict[float, list[float]] = defaultdict(list)
        for compute, value in pts:
            by_compute[compute].append(value)
        xs = sorted(by_compute)
        summaries = [st.cell_summary(by_compute[x]) for x in xs]
        errors = [h if math.isfinite(h) else 0.0 for _, h, _ in summaries]
        fit = fits.get(name)
        label = name + (f" (alpha {fit.alpha:.3g})" if fit else "")
        container = axis.errorbar(xs, [m for m, _, _ in summaries], yerr=errors, fmt="o", capsize=3, label=label)
        if fit:
            axis.plot(xs, [fit.predict(x) for x in xs], "-", color=container[0].get_color(), alpha=0.6)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("training compute per token of a sample (FLOPs: 6 x block weights x samples seen)")
    axis.set_ylabel(what)
    axis.set_title(f"{what}: mean, 95 % interval, power-law fit", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    return save_figure(figure, path)


# ---- tables -----------------------------------------------------------------------------------------


# One probe cell as the evaluation suite logs it: probe_grid[/<modality>]/<kind>/t<level>_block<k>.
PROBE_NAME = re.compile(
    r"^probe_grid/(?:(?P<modality>[^/]+)/)?(?P<kind>linear|knn)/t(?P<level>[0-9.e-]+)_block(?P<block>\d+)$")


def metric_table(cells: Cells, table: TableSpec) -> list[str]:
    planned = cells.plan.sweep(table.sweep)
    if planned is None:
        return [f"(no sweep named `{table.sweep}` in this study)"]
    rows = []
    for cell in planned.cells:
        ref = CellRef(table.sweep, cell, table.modality)
        runs = cells.runs(ref)
        rows.append([cell, f"{len(runs)}/{len(planned.seeds)}",
                     *(cell_text(list(cells.final(ref, m).values())) for m in table.metrics)])
    return md_table(["cell", "seeds", *table.metrics], rows)


def probe_table(cells: Cells, table: TableSpec) -> list[str]:
    planned = cells.plan.sweep(table.sweep)
    if planned is None:
        return [f"(no sweep named `{table.sweep}` in this study)"]
    grid: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    levels: set[str] = set()
    for cell in planned.cells:
        for run in cells.runs(CellRef(table.sweep, cell)):
            for name, value in run.metrics.items():
                match = PROBE_NAME.match(name)
                if match and match["kind"] == table.probes and (match["modality"] or "") == table.modality:
                    grid[(cell, int(match["block"]), match["level"])].append(value)
                    levels.add(match["level"])
    if not grid:
        return ["(no probe metrics among the finished runs)"]
    ordered = sorted(levels, key=float)
    rows = []
    for cell in planned.cells:
        for block in sorted({b for c, b, _ in grid if c == cell}):
            rows.append([cell, str(block), *(cell_text(grid.get((cell, block, level), [])) for level in ordered)])
    return md_table(["cell", "block", *(f"t = {level}" for level in ordered)], rows)


# ---- the report -------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Path
    plots: list[Path]
    claims: list[ClaimResult]
    finished: int
    planned: int


def evaluate_claims(cells: Cells, plan: ReportPlan, plots_dir: Path, link) -> list[ClaimResult]:
    results = []
    for claim in plan.claims:
        if claim.kind in ("better", "no_better", "no_worse"):
            results.append(evaluate_ordering(cells, claim))
        elif claim.kind == "faster":
            results.append(evaluate_faster(cells, claim))
        else:
            results.append(evaluate_scaling(cells, claim, plots_dir, link))
    tested = [row for result in results for row in result.rows if row.diff is not None and row.diff.defined]
    for row, adjusted in zip(tested, st.holm([row.diff.p_value for row in tested])):
        row.p_holm = adjusted
    return results


def claim_section(result: ClaimResult, family: int) -> list[str]:
    claim = result.spec
    lines = [f"### Claim {claim.id}: {claim.statement}", "",
             f"Kind `{claim.kind}`, metric `{claim.metric}` ({'lower' if claim.mode == 'min' else 'higher'} is better)"
             + (f", margin {claim.margin:g}" if claim.kind in ("no_better", "no_worse") else "")
             + (", at equal training wall time" if claim.at == "wall" else "")
             + f". Verdict: **{result.verdict}**.", ""]
    if claim.kind == "scaling":
        lines += result.extra + [""]
        lines += md_table(["A", "B", "A", "B", "comparison", "verdict"],
                          [[r.a, r.b, *r.cells, r.note, f"**{r.verdict}**"] for r in result.rows])
        return lines + [""]
    header = ["A", "B", "A (mean ± 95 % CI)", "B (mean ± 95 % CI)",
              "improvement of A [95 % CI]" if claim.kind != "faster" else "B - A [95 % CI]",
              "test", "p", f"p (Holm, {family} tests)", "effect size", "verdict"]
    rows = []
    for r in result.rows:
        d = r.diff
        interval = f"{num(d.improvement)} [{num(d.low)}, {num(d.high)}]" if d and d.defined else "-"
        effect = f"{d.effect_name} = {num(d.effect_size, 3)}" if d and d.defined else "-"
        rows.append([r.a, r.b, *r.cells, interval + (f" ({r.note})" if r.note else ""), (d.test if d else "") or "-",
                     pval(d.p_value) if d else "-", pval(r.p_holm), effect, f"**{r.verdict}**"])
    return lines + md_table(header, rows) + [""]


def write_report(plan: ReportPlan, store: StudyStore, out: str | Path, plots_dir: str | Path | None = None) -> Report:
    """Write the report to `out` and its plots to `plots_dir` (default: `<out's folder>/results`)."""
    out = Path(out)
    plots_dir = Path(plots_dir) if plots_dir else out.parent / "results"
    plots_dir.mkdir(parents=True, exist_ok=True)

    def link(path: Path) -> str:
        try:
            return path.resolve().relative_to(out.resolve().parent).as_posix()
        except ValueError:
            return path.resolve().as_posix()

    cells = Cells.load(store, plan)
    results = evaluate_claims(cells, plan, plots_dir, link)
    finished = sum(len(v) for v in cells.by_cell.values())
    lines = [f"# {plan.title or 'Study ' + plan.study}", ""]
    if plan.budget == "quick":
        lines += ["> **Quick budget: a smoke test of the study machinery, not results.** Every trial ran a "
                  "few steps; the numbers below say nothing about the objectives.", ""]
    lines += [f"Study `{plan.study}` at the **{plan.budget}** budget: {finished} of {len(plan.trials)} planned "
              f"trials finished. Written by `{plan.command}` from the MLflow experiment `{plan.experiment}` "
              f"alone; `{plan.command} --report-only` rewrites this file and its plots byte for byte.", ""]

    lines += ["## Verdicts", ""]
    lines += md_table(["claim", "statement", "verdict"], [[r.spec.id, r.spec.statement, f"**{r.verdict}**"] for r in results])
    lines += ["", "## How a verdict is decided", ""]
    for kind in sorted({r.spec.kind for r in results}, key=CLAIM_KINDS.index):
        lines.append(f"- `{kind}`: {st.RULES[kind]}")
    family = sum(1 for r in results for row in r.rows if row.diff is not None and row.diff.defined)
    lines += [
        "", "A cell is one configuration trained with several seeds; its value is the mean over seeds with "
        "the 95 % Student-t interval. Two cells with the same seeds are compared with a paired t-test "
        "(effect size d_z = mean difference / SD of the differences); otherwise with Welch's t-test "
        "(effect size Hedges' g). Improvements are signed so that positive favours A. The verdicts use "
        f"each comparison's own 95 % interval; the Holm-adjusted p-values over all {family} tests of this "
        "report show which would survive a family-wise correction. A claim of several comparisons holds if "
        "every one holds and does not hold if any does not. Training wall time is steps x the run's median "
        "seconds per step between consecutive training logs (evaluation, checkpoints and pauses between "
        "sittings excluded).", ""]

    lines += ["## Coverage", ""]
    coverage = []
    for sweep in plan.sweeps:
        runs = [r for c in sweep.cells for r in cells.runs(CellRef(sweep.name, c))]
        hours = sum(r.duration_s for r in runs if math.isfinite(r.duration_s)) / 3600
        coverage.append([sweep.section, sweep.name, str(len(sweep.cells)), ", ".join(map(str, sweep.seeds)),
                         f"{len(runs)}/{len(sweep.cells) * len(sweep.seeds)}", f"{hours:.2f}",
                         sweep.note or sweep.description])
    lines += md_table(["section", "sweep", "cells", "seeds", "finished", "run hours", "what"], coverage) + [""]

    lines += ["## Claims", ""]
    for result in results:
        lines += claim_section(result, family)

    plots: list[Path] = [p for result in results for p in result.plots]
    if plan.tables:
        lines += ["## Tables", ""]
        for table in plan.tables:
            lines += [f"### {table.title}", ""]
            lines += (probe_table(cells, table) if table.probes else metric_table(cells, table)) + [""]
    if plan.plots:
        lines += ["## Curves", ""]
        for spec in plan.plots:
            for metric in spec.metrics:
                name = f"{slug(spec.sweep)}_{slug(metric)}" + (f"_{slug(spec.modality)}" if spec.modality else "")
                path = plot_curves(cells, spec.sweep, metric, spec.modality, plots_dir / f"{name}.png")
                if path is not None:
                    plots.append(path)
                    lines += [f"![{spec.sweep}: {metric}]({link(path)})", ""]
    if plan.notes:
        lines += ["## Notes", "", plan.notes.rstrip(), ""]
    lines += ["## Sweeps", ""]
    for sweep in plan.sweeps:
        lines += [f"- `{sweep.name}` ({sweep.section}): {sweep.description}; cells: "
                  + (", ".join(f"`{c}`" for c in sweep.cells) or "none") + "."]
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return Report(out, sorted(set(plots)), results, finished, len(plan.trials))
