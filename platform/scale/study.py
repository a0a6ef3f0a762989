"""`selfflow study <study gin file>`: named sweeps run as Ray Tune sweeps, then a report (RESULTS.md
and plots) written from the MLflow store alone.

A study file binds `Study.*` (experiments/studies/*.gin):

    Study.name = 'paper'
    Study.seeds = [0, 1, 2]                       # every sweep's seeds unless its entry sets 'seeds'
    Study.sections = {'digits': ['objectives'], 'modalities': ['audio']}   # run order; --section picks
    Study.sweeps = {
        'objectives': {'file': 'sweeps/digits_objectives.gin',            # an existing sweep file ...
                       'bindings': ['TrainConfig.steps = 1500']},         # ... with fields replaced
        'audio': {'space': {'include': ('presets', ['audio/fm.gin', 'audio/repa*.gin'])}},  # inline
    }
    Study.prerequisites = {'digits': [['data', 'digits'], ['encoder', 'encoders/digits_*.gin']]}
    Study.tables = [{'title': ..., 'sweep': 'objectives', 'metrics': ['eval/fd']}]
    Study.plots = [{'sweep': 'objectives', 'metrics': ['eval/fd']}]
    Study.claims = [{'id': '1', 'statement': ..., 'kind': 'better', 'metric': 'eval/fd',
                     'a': 'objectives:selfflow', 'b': ['objectives:fm']}]
    Study.quick_bindings = ['TrainConfig.steps = 20']   # --quick: appended to every trial
    Study.quick_seeds = [0, 1, 2]

A sweep entry takes the fields of `Sweep` (platform/scale/sweep.py: base_files, bindings, space,
max_concurrent, workers_per_trial, ...) plus 'file' (a sweep file to start from: the entry's fields
replace the file's), 'add_bindings' (appended to the bindings) and 'description'. Every axis of a
study's space is a grid, so every trial is known before any runs; ('presets', [patterns]) is a grid
over the gin files under experiments/ matching the patterns, whatever exists when the study runs
(a pattern matching nothing drops out, and the report says so).

Resuming: each trial's identity is a content hash (tag `study.key`) of the study, sweep, budget and
the trial's whole parsed gin config (its seed included). Before a sweep runs, the MLflow store is
asked which keys have a FINISHED run; only the others run. A trial's folder is named by its key, so
one killed mid-way continues from its last checkpoint in its own MLflow run. `--report-only`
trains nothing and rewrites the report from the store.

`--quick`: the same plan with `Study.quick_bindings` and `quick_seeds`, under its own MLflow
experiment (`<experiment>-quick`), runs folder and budget tag, so quick trials never count as full
ones; its report goes to `<runs>/studies/<name>-quick/RESULTS.md` unless --out says otherwise.
Trained prerequisites (encoders) are made at `Study.quick_prerequisite_bindings` into the quick
study's folder, and every quick trial binding that names the real file is pointed at the quick
copy: a quick study never writes, nor waits for, the full study's encoders.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import gin

from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.configurable import configurable
from selfflow.platform.errors import ConfigError, UserError
from selfflow.platform.scale.sweep import (
    INCLUDE_KEY,
    SEED_KEY,
    SweepResult,
    SweepSpec,
    load_spec,
    run_sweep,
    trial_bindings,
)
from selfflow.platform.tracking import study_report as report
from selfflow.platform.tracking import study_store as store_tags

NAME = re.compile(r"[A-Za-z0-9_-]+")
ENTRY_ONLY = ("file", "add_bindings", "description")
SET_BY_STUDY = ("name", "experiment", "search", "num_samples", "scheduler", "seeds")
PREREQUISITE_KINDS = ("data", "encoder", "autoencoder")


# ---- the study file ---------------------------------------------------------------------------------


@dataclass
class StudySpec:
    name: str
    title: str
    experiment: str
    seeds: list[int]
    sections: dict[str, list[str]]
    sweeps: dict[str, dict]
    prerequisites: dict[str, list[list[str]]] = field(default_factory=dict)
    tables: list[dict] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    quick_bindings: list[str] = field(default_factory=list)
    quick_seeds: list[int] | None = None
    quick_prerequisite_bindings: list[str] = field(default_factory=list)
    notes: str = ""
    max_concurrent: int = 0


@configurable("Study", module="selfflow")
def study_spec(
    name: str = gin.REQUIRED,
    title: str = "",
    experiment: str = "",
    seeds: Sequence[int] = (0, 1, 2),
    sections: dict | None = None,
    sweeps: dict | None = None,
    prerequisites: dict | None = None,
    tables: Sequence[dict] = (),
    plots: Sequence[dict] = (),
    claims: Sequence[dict] = (),
    quick_bindings: Sequence[str] = (),
    quick_seeds: Sequence[int] | None = None,
    quick_prerequisite_bindings: Sequence[str] = (),
    notes: str = "",
    max_concurrent: int = 0,
) -> StudySpec:
    sweeps = {str(k): dict(v) for k, v in dict(sweeps or {}).items()}
    sections = {str(k): list(v) for k, v in dict(sections or {"main": list(sweeps)}).items()}
    return StudySpec(
        name=name, title=title, experiment=experiment or f"study_{name}", seeds=list(seeds), sections=sections,
        sweeps=sweeps, prerequisites={str(k): [list(p) for p in v] for k, v in dict(prerequisites or {}).items()},
        tables=[dict(t) for t in tables], plots=[dict(p) for p in plots], claims=[dict(c) for c in claims],
        quick_bindings=list(quick_bindings), quick_seeds=list(quick_seeds) if quick_seeds is not None else None,
        quick_prerequisite_bindings=list(quick_prerequisite_bindings),
        notes=notes, max_concurrent=max_concurrent,
    )


def load_study(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[StudySpec, Path]:
    resolved = gin_config.resolve_config_file(path)
    gin_config.parse([resolved], overrides, finalize=False)
    try:
        spec = study_spec()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{resolved}: {str(error).strip().splitlines()[0]}") from None
    finally:
        gin.clear_config()
    check_study(spec, resolved)
    return spec, resolved


def check_study(spec: StudySpec, where: Path) -> None:
    if not NAME.fullmatch(spec.name):
        raise ConfigError(f"{where}: Study.name must be letters, digits, '_' or '-', got {spec.name!r}")
    if not spec.sweeps:
        raise ConfigError(f"{where}: Study.sweeps is empty")
    listed = [s for names in spec.sections.values() for s in names]
    for name in spec.sweeps:
        if not NAME.fullmatch(name):
            raise ConfigError(f"{where}: sweep name {name!r} must be letters, digits, '_' or '-'")
        if listed.count(name) != 1:
            raise ConfigError(f"{where}: sweep {name!r} must be in exactly one of Study.sections")
    unknown = [s for s in listed if s not in spec.sweeps]
    if unknown:
        raise ConfigError(f"{where}: Study.sections names sweeps not in Study.sweeps: {unknown}")
    for section, items in spec.prerequisites.items():
        if section not in spec.sections:
            raise ConfigError(f"{where}: Study.prerequisites names section {section!r}, not in Study.sections")
        for item in items:
            if len(item) != 2 or item[0] not in PREREQUISITE_KINDS:
                raise ConfigError(f"{where}: a prerequisite is [kind, target] with kind in {PREREQUISITE_KINDS}, "
                                  f"got {item!r}")
    for seeds in (spec.seeds, spec.quick_seeds or [0]):
        if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError(f"{where}: seeds must be non-empty lists of ints >= 0, got {seeds!r}")


# ---- sweeps and their trials ------------------------------------------------------------------------


@dataclass
class PlannedSweep:
    name: str
    section: str
    spec: SweepSpec | None  # None: no trial (a preset pattern matched nothing)
    base_config: str
    trials: list[dict]  # {'sampled', 'key', 'cell', 'axes'}
    description: str
    note: str = ""


def expand_presets(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Gin files under experiments/ (or the cwd) matching the patterns, sorted per pattern, first
    match wins; and the patterns that matched nothing."""
    found, missing = [], []
    for pattern in patterns:
        matches = sorted(
            {Path(p).relative_to(gin_config.EXPERIMENTS_DIR).as_posix()
             for p in glob.glob(str(gin_config.EXPERIMENTS_DIR / pattern))} | set(glob.glob(pattern)))
        matches = [m for m in matches if m.endswith(".gin")]
        if not matches:
            missing.append(pattern)
        found += [m for m in matches if m not in found]
    return found, missing


def short_values(key: str, values: Sequence[Any]) -> list[str]:
    """Cell-label parts for one axis: a gin file by its shortest unique path suffix without '.gin'
    ('digits/fm.gin' -> 'fm'), any other binding as `name=value`."""
    if key == INCLUDE_KEY:
        paths = [Path(str(v)).with_suffix("").parts for v in values]
        for depth in range(1, max(len(p) for p in paths) + 1):
            labels = ["/".join(p[-depth:]) for p in paths]
            if len(set(labels)) == len(labels):
                return labels
        return ["/".join(p) for p in paths]
    name = key.rsplit(".", 1)[-1]
    return [f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}" for v in values]


def build_sweep_spec(study: StudySpec, name: str, entry: dict, *, quick: bool, experiment: str) -> tuple[SweepSpec | None, str, str]:
    """The SweepSpec of one study entry (None when a preset axis matched nothing), its description
    and a note."""
    known = {f.name for f in fields(SweepSpec)}
    unknown = sorted(set(entry) - known - set(ENTRY_ONLY))
    where = f"Study.sweeps[{name!r}]"
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; use Sweep fields or {list(ENTRY_ONLY)}")
    fixed = sorted(set(entry) & set(SET_BY_STUDY))
    if fixed and fixed != ["seeds"]:
        raise ConfigError(f"{where}: {fixed} are set by the study (grid search, one sample, fifo, its name)")
    values: dict[str, Any] = {}
    if "file" in entry:
        loaded, _ = load_spec(entry["file"])
        values = {f.name: getattr(loaded, f.name) for f in fields(SweepSpec)}
        if loaded.search != "grid" or loaded.scheduler != "fifo":
            raise ConfigError(f"{where}: {entry['file']} uses search={loaded.search!r}, scheduler="
                              f"{loaded.scheduler!r}; a study's trials are a grid run to the end (fifo)")
    values.update({k: v for k, v in entry.items() if k in known})
    values["bindings"] = list(values.get("bindings", [])) + list(entry.get("add_bindings", []))
    seeds = entry.get("seeds") or study.seeds
    if quick:
        values["bindings"] += study.quick_bindings
        seeds = study.quick_seeds or seeds
    space, notes = {}, []
    for key, spec in dict(values.get("space") or {}).items():
        spec = tuple(spec)
        if spec and spec[0] == "presets":
            if key != INCLUDE_KEY:
                raise ConfigError(f"{where}: ('presets', [...]) chooses gin files: use it for 'include', not {key!r}")
            found, missing = expand_presets(list(spec[1]))
            if missing:
                notes.append(f"no preset matches {', '.join(missing)}")
            if not found:
                return None, entry.get("description", ""), "; ".join(notes)
            spec = ("grid", found)
        if not spec or spec[0] != "grid":
            raise ConfigError(f"{where}: space['{key}'] is {spec[:1]}; a study's axes are grids (or presets), so "
                              f"every trial is known before any runs")
        space[key] = spec
    values.update(space=space, seeds=list(seeds), name=f"{study.name}{'-quick' if quick else ''}.{name}",
                  experiment=experiment, search="grid", num_samples=1, scheduler="fifo",
                  max_concurrent=entry.get("max_concurrent", study.max_concurrent))
    values.setdefault("base_files", [])
    description = entry.get("description") or (f"from {entry['file']}" if "file" in entry else "inline sweep")
    return SweepSpec(**values), description, "; ".join(notes)


def trial_key(study: str, sweep: str, budget: str, config: str) -> str:
    text = "\n".join([study, sweep, budget, config])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan_trials(study: StudySpec, name: str, spec: SweepSpec, budget: str,
                redirects: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """Every trial of the sweep: the grid crossed with the seeds, each parsed (so a broken config
    fails here, before anything trains) and keyed by its config. `redirects`: prerequisite paths
    to replace (--quick), as extra bindings of the trials that name them."""
    base_config = gin_config.parse(spec.base_files, [], finalize=False) if spec.base_files else ""
    axes = list(spec.space.items())
    labels = [short_values(key, list(values)) for key, (_, values) in axes]
    trials = []
    combos = itertools.product(*[list(enumerate(values)) for _, (_, values) in axes])
    for combo in combos:
        cell = " ".join(labels[axis][index] for axis, (index, _) in enumerate(combo)) or "all"
        for seed in spec.seeds:
            sampled = {key: value for (key, _), (_, value) in zip(axes, combo)}
            sampled[SEED_KEY] = seed
            bindings = trial_bindings(spec, sampled)
            try:
                gin_config.parse_config_string(base_config, bindings)
                extra = redirect_bindings(gin.config_str(), redirects or {})
                if extra:
                    gin_config.parse_config_string(base_config, bindings + extra)
            except ConfigError as error:
                raise ConfigError(f"study {study.name}, sweep {name}, trial {bindings}: {error.one_line()}") from None
            config = gin.config_str()
            trials.append({"sampled": sampled, "cell": cell, "key": trial_key(study.name, name, budget, config),
                           "axes": tuple((k, str(v)) for k, v in sampled.items() if k != SEED_KEY),
                           "bindings": extra})
    gin.clear_config()
    return base_config, trials


@dataclass
class Study:
    spec: StudySpec
    path: Path
    quick: bool
    runs_dir: Path
    sweeps: list[PlannedSweep]
    command: str

    @property
    def budget(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def experiment(self) -> str:
        return self.spec.experiment + ("-quick" if self.quick else "")

    @property
    def folder(self) -> Path:
        return study_folder(self.runs_dir, self.spec.name, self.quick)

    def run_dir(self, sweep: str, trial: dict) -> Path:
        return self.folder / "trials" / sweep / f"{report.slug(trial['cell'])}-seed{trial['sampled'][SEED_KEY]}-{trial['key'][:8]}"

    def report_plan(self) -> report.ReportPlan:
        spec = self.spec
        planned = []
        trials = []
        for sweep in self.sweeps:
            cells = list(dict.fromkeys(t["cell"] for t in sweep.trials))
            planned.append(report.PlannedSweep(sweep.name, sweep.section, tuple(cells),
                                               tuple(sweep.spec.seeds) if sweep.spec else (), sweep.description,
                                               sweep.note))
            trials += [report.PlannedTrial(t["key"], sweep.name, t["cell"], int(t["sampled"][SEED_KEY]), t["axes"])
                       for t in sweep.trials]
        return report.ReportPlan(
            study=spec.name, title=spec.title, budget=self.budget, experiment=self.experiment, command=self.command,
            sweeps=tuple(planned), trials=tuple(trials), tables=tuple(table_specs(spec)),
            plots=tuple(plot_specs(spec)), claims=tuple(claim_specs(spec)), notes=read_notes(spec),
        )


def study_folder(runs_dir: Path, name: str, quick: bool) -> Path:
    return runs_dir / "studies" / (name + ("-quick" if quick else ""))


def canonical_name(path: Path, given: str) -> str:
    """How the report names the study file: relative to experiments/ when it is there (it then
    resolves from any folder), else as given."""
    try:
        return path.relative_to(gin_config.EXPERIMENTS_DIR).as_posix()
    except ValueError:
        return given


def plan_study(path: str | os.PathLike, overrides: Sequence[str] = (), *, quick: bool = False,
               runs_dir: str | os.PathLike = "runs") -> Study:
    spec, resolved = load_study(path, overrides)
    sweeps = []
    budget = "quick" if quick else "full"
    experiment = spec.experiment + ("-quick" if quick else "")
    runs_dir = Path(runs_dir).resolve()
    folder = study_folder(runs_dir, spec.name, quick)
    redirects = quick_redirects(prerequisite_jobs(spec, list(spec.sections), folder)) if quick else {}
    for section, names in spec.sections.items():
        for name in names:
            sweep_spec, description, note = build_sweep_spec(spec, name, spec.sweeps[name], quick=quick,
                                                             experiment=experiment)
            base, trials = plan_trials(spec, name, sweep_spec, budget, redirects) if sweep_spec else ("", [])
            sweeps.append(PlannedSweep(name, section, sweep_spec, base, trials, description, note))
    command = "selfflow study " + canonical_name(resolved, str(path)) + (" --quick" if quick else "")
    command += "".join(f' --gin_param "{o}"' for o in overrides)
    study = Study(spec, resolved, quick, runs_dir, sweeps, command)
    study.report_plan()  # check tables, plots and claims before anything trains
    return study


# ---- what the report needs from the study file --------------------------------------------------------


def _entries(items: Sequence[dict], allowed: set[str], where: str) -> list[dict]:
    for item in items:
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown} in {item!r}; allowed: {sorted(allowed)}")
    return list(items)


def table_specs(spec: StudySpec) -> list[report.TableSpec]:
    out = []
    for item in _entries(spec.tables, {"title", "sweep", "metrics", "probes", "modality"}, "Study.tables"):
        if item.get("sweep") not in spec.sweeps:
            raise ConfigError(f"Study.tables: sweep {item.get('sweep')!r} is not in Study.sweeps")
        out.append(report.TableSpec(title=item.get("title", item["sweep"]), sweep=item["sweep"],
                                    metrics=tuple(item.get("metrics", ())), probes=item.get("probes", ""),
                                    modality=item.get("modality", "")))
    return out


def plot_specs(spec: StudySpec) -> list[report.PlotSpec]:
    out = []
    for item in _entries(spec.plots, {"sweep", "metrics", "modality"}, "Study.plots"):
        if item.get("sweep") not in spec.sweeps:
            raise ConfigError(f"Study.plots: sweep {item.get('sweep')!r} is not in Study.sweeps")
        out.append(report.PlotSpec(sweep=item["sweep"], metrics=tuple(item.get("metrics", ())),
                                   modality=item.get("modality", "")))
    return out


def claim_specs(spec: StudySpec) -> list[report.ClaimSpec]:
    allowed = {f.name for f in fields(report.ClaimSpec)}
    out = []
    for item in _entries(spec.claims, allowed, "Study.claims"):
        item = dict(item)
        for required in ("id", "statement", "kind", "metric", "a", "b"):
            if required not in item:
                raise ConfigError(f"Study.claims: {item.get('id', item)!r} needs {required!r}")
        item["b"] = tuple([item["b"]] if isinstance(item["b"], str) else item["b"])
        item.setdefault("mode", report.default_mode(item["metric"]) or "")
        item["threshold"] = float(item.get("threshold", math.nan))
        item["margin"] = float(item.get("margin", 0.05))
        claim = report.ClaimSpec(**item)
        sweeps = [claim.sweep] if claim.kind == "scaling" else \
            [report.CellRef.parse(c, claim.id).sweep for c in (claim.a, *claim.b)]
        for sweep in sweeps:
            if sweep not in spec.sweeps:
                raise ConfigError(f"Study.claims[{claim.id!r}]: sweep {sweep!r} is not in Study.sweeps")
        out.append(claim)
    return out


def read_notes(spec: StudySpec) -> str:
    if not spec.notes:
        return ""
    for candidate in (Path(spec.notes), gin_config.EXPERIMENTS_DIR / spec.notes):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ConfigError(f"Study.notes: file not found: {spec.notes} (looked in ., {gin_config.EXPERIMENTS_DIR})")


# ---- prerequisites ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prerequisite:
    kind: str  # data | encoder | autoencoder
    target: str  # a dataset name or a gin file
    output: Path  # where the trials read it (for --quick: a quick copy under the study's folder)
    selector: str = ""  # the binding that names the output (EncoderTraining.out, ...)
    original: str = ""  # the output path as the gin file names it


def prerequisite_jobs(spec: StudySpec, sections: Sequence[str], quick_folder: Path | None = None,
                      verbose: bool = False) -> list[Prerequisite]:
    """Every prerequisite of the sections, existing or not. With `quick_folder` (--quick), trained
    ones (encoders, autoencoders) are made at Study.quick_prerequisite_bindings under that folder and
    the trials are pointed there; data is shared."""
    from selfflow.platform.data.shards import index_path_for

    jobs: list[Prerequisite] = []
    for section in sections:
        for kind, target in spec.prerequisites.get(section, []):
            if kind == "data":
                jobs.append(Prerequisite(kind, target, index_path_for(Path("data") / target, "test")))
                continue
            files, missing = expand_presets([target])
            if missing and verbose:
                print(f"selfflow study: prerequisite {kind} {target}: no gin file matches; nothing to make", flush=True)
            selector = "EncoderTraining.out" if kind == "encoder" else "AutoencoderTraining.out"
            for file in files:
                out = gin_config.peek_binding([file], [], selector)
                if out is None:
                    raise ConfigError(f"prerequisite {kind} {file}: it sets no {selector}")
                output = quick_folder / "prerequisites" / out if quick_folder else Path(out)
                jobs.append(Prerequisite(kind, file, output, selector, out))
    return list(dict.fromkeys(jobs))  # sections may share one


def quick_redirects(jobs: Sequence[Prerequisite]) -> dict[str, str]:
    """{path a gin file names: path of its quick copy} for --quick's trials."""
    return {job.original: str(job.output) for job in jobs if job.original and str(job.output) != job.original}


def redirect_bindings(config: str, redirects: dict[str, str]) -> list[str]:
    """Bindings that point every binding whose value is a redirected path at the redirect."""
    if not redirects:
        return []
    out = []
    for key, value in gin_config.flatten_config(config).items():
        unquoted = value.strip()
        if len(unquoted) >= 2 and unquoted[0] == unquoted[-1] and unquoted[0] in "'\"":
            unquoted = unquoted[1:-1]
        if unquoted in redirects:
            out.append(f"{key} = {redirects[unquoted]!r}")
    return out


def make_prerequisites(study: Study, sections: Sequence[str]) -> list[str]:
    """Build what the sections' trials read and is missing (data shards, REPA encoders,
    autoencoders). Returns what was made."""
    made = []
    for job in prerequisite_jobs(study.spec, sections, study.folder if study.quick else None, verbose=True):
        if job.output.exists():
            continue
        started = time.perf_counter()
        print(f"selfflow study: making prerequisite {job.kind} {job.target} -> {job.output}", flush=True)
        if job.kind == "data":
            from selfflow.platform.data import shards

            builders = {"digits": shards.build_digits_shards, "moving_digits": shards.build_moving_digits_shards,
                        "spoken_digits": shards.build_spoken_digits_shards}
            if job.target not in builders:
                raise ConfigError(f"prerequisite data {job.target!r}: one of {sorted(builders)}")
            builders[job.target](Path("data") / job.target, seed=0)
        else:
            bindings = [*study.spec.quick_prerequisite_bindings, f"{job.selector} = {str(job.output)!r}"] \
                if study.quick else []
            if job.kind == "encoder":  # imported first: importing registers the configurable
                from selfflow.platform.jobs.encoders import EncoderTraining as Job
            else:
                from selfflow.platform.jobs.autoencoders import AutoencoderTraining as Job
            gin_config.parse([job.target], bindings)
            try:
                Job().run()
            finally:
                gin.clear_config()
        made.append(f"{job.kind} {job.target} ({time.perf_counter() - started:.0f} s)")
    return made


# ---- running ------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    report: report.Report | None
    ran: dict[str, SweepResult]
    skipped: dict[str, int]  # sweep -> finished trials found in the store
    failed: list[str]
    wall_s: float
    interrupted: tuple[str, int] | None = None  # (sweep, signal) that stopped the study; no report then


def open_store(study: Study, tracking_uri: str | None):
    from selfflow.platform.tracking.mlflow_tracker import default_tracking_uri
    from selfflow.platform.tracking.study_store import StudyStore

    uri = tracking_uri or default_tracking_uri(study.runs_dir)
    return StudyStore(uri, study.experiment, study.spec.name, study.budget)


def trial_tags(study: Study, sweep: PlannedSweep, trial: dict) -> dict[str, str]:
    return {store_tags.TAG_STUDY: study.spec.name, store_tags.TAG_BUDGET: study.budget,
            store_tags.TAG_SWEEP: sweep.name, store_tags.TAG_CELL: trial["cell"], store_tags.TAG_KEY: trial["key"],
            "study.section": sweep.section}


def selected(study: Study, sections: Sequence[str] | None) -> list[str]:
    names = list(study.spec.sections)
    if not sections:
        return names
    unknown = [s for s in sections if s not in names]
    if unknown:
        raise UserError(f"--section {unknown[0]!r}: the study's sections are {names}")
    return [s for s in names if s in sections]


def run_study(study: Study, *, sections: Sequence[str] | None = None, tracking_uri: str | None = None,
              out: str | os.PathLike | None = None, plots_dir: str | os.PathLike | None = None,
              report_only: bool = False) -> StudyResult:
    """Run the trials of the chosen sections that the store has not finished, then write the report.
    A sweep stopped by SIGINT/SIGTERM ends the sitting there, without a report (`interrupted`)."""
    started = time.perf_counter()
    chosen = selected(study, sections)
    store = open_store(study, tracking_uri)
    ran: dict[str, SweepResult] = {}
    skipped: dict[str, int] = {}
    failed: list[str] = []
    if not report_only:
        for item in make_prerequisites(study, chosen):
            print(f"selfflow study: made {item}", flush=True)
        sitting = study.folder / "sittings" / time.strftime("%Y%m%d-%H%M%S")
        for sweep in study.sweeps:
            if sweep.section not in chosen or sweep.spec is None:
                continue
            done = store.finished_keys()
            missing = [t for t in sweep.trials if t["key"] not in done]
            skipped[sweep.name] = len(sweep.trials) - len(missing)
            print(f"selfflow study: {sweep.name}: {len(sweep.trials)} trials, {skipped[sweep.name]} finished "
                  f"before, {len(missing)} to run", flush=True)
            if not missing:
                continue
            points = [{"sampled": t["sampled"], "run_dir": str(study.run_dir(sweep.name, t)),
                       "tags": trial_tags(study, sweep, t), "bindings": t["bindings"]} for t in missing]
            result = run_sweep(None, spec=sweep.spec, points=points, runs_dir=study.runs_dir,
                               sweep_dir=sitting / sweep.name, tracking_uri=store.tracking_uri, compare=False,
                               description=sweep.description,
                               parent_tags={store_tags.TAG_STUDY: study.spec.name,
                                            store_tags.TAG_BUDGET: study.budget, store_tags.TAG_SWEEP: sweep.name})
            ran[sweep.name] = result
            failed += [f"{sweep.name}: {t.group} seed {t.seed}: {t.error}" for t in result.failed]
            if result.interrupted:  # a signal ends the sitting: no later sweep starts
                return StudyResult(None, ran, skipped, failed, time.perf_counter() - started,
                                   interrupted=(sweep.name, result.interrupted))
            store = open_store(study, tracking_uri)  # a fresh read for the next sweep
    plan = study.report_plan()
    planned_keys = {t.key for t in plan.trials}
    if report_only and not any(r.key in planned_keys for r in store.runs()):
        raise UserError(f"no finished trial of study {study.spec.name!r} ({study.budget} budget) in MLflow "
                        f"experiment {study.experiment!r} at {store.tracking_uri}: nothing to report")
    written = report.write_report(plan, store, Path(out) if out else default_report_path(study), plots_dir)
    if not report_only:
        log_report(study, store, written)
    return StudyResult(written, ran, skipped, failed, time.perf_counter() - started)


def default_report_path(study: Study) -> Path:
    return study.folder / "RESULTS.md" if study.quick else Path("RESULTS.md")


def log_report(study: Study, store, written: report.Report) -> None:
    """The report and its plots as artifacts of the study's one report run (reused across sittings)."""
    client = store.client
    experiment_id = store.experiment_id()
    if experiment_id is None:
        return
    found = client.search_runs([experiment_id], filter_string=f"tags.{store_tags.TAG_STUDY} = '{study.spec.name}'"
                               f" and tags.`{store_tags.TAG_ROLE}` = 'report'", max_results=10)
    found = [r for r in found if r.data.tags.get(store_tags.TAG_BUDGET) == study.budget]
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=f"study-{study.spec.name}-{study.budget}-report", tags={
            store_tags.TAG_STUDY: study.spec.name, store_tags.TAG_BUDGET: study.budget,
            store_tags.TAG_ROLE: "report"}).info.run_id
    client.log_artifact(run_id, str(written.path), "report")
    for plot in written.plots:
        client.log_artifact(run_id, str(plot), "report/results")
    client.set_terminated(run_id, "FINISHED")


def describe(study: Study, store) -> list[str]:
    """What `selfflow study --plan` prints: per sweep its cells, trials and how many are finished."""
    done = store.finished_keys()
    lines = [f"study {study.spec.name} ({study.budget} budget), MLflow experiment {study.experiment}"]
    for sweep in study.sweeps:
        finished = sum(t["key"] in done for t in sweep.trials)
        cells = list(dict.fromkeys(t["cell"] for t in sweep.trials))
        lines.append(f"  [{sweep.section}] {sweep.name}: {len(cells)} cells x "
                     f"{len(sweep.spec.seeds) if sweep.spec else 0} seeds = {len(sweep.trials)} trials, "
                     f"{finished} finished" + (f"  ({sweep.note})" if sweep.note else ""))
    for job in prerequisite_jobs(study.spec, list(study.spec.sections), study.folder if study.quick else None):
        lines.append(f"  prerequisite {job.kind} {job.target}: {'present' if job.output.exists() else 'missing'} "
                     f"({job.output})")
    return lines
