"""``sdip tune TASK IMAGE``: tune λ (optionally lr, Gaussian σ) for one image (DVC stage ``tune``).

IMAGE is either

- an image file (standalone, like ``sdip fit``): a clean image degraded here with the task options
  (``--sigma`` …), or with ``--observed`` a degraded photo (no clean image: holdout objective
  only); the fit settings are the task defaults and ``sdip fit``'s options; or
- the name of a prepared observation, ``data/prepared/TASK/<variant>/IMAGE`` (the pipeline): the
  fit settings are params.yaml's ``fit`` < ``tasks.TASK.fit`` < ``methods.<--method>`` < the
  options, and params.yaml's ``tune`` section gives the tuning defaults.

``--batch K`` (params.yaml ``tune.batch``; 1 by default) fits K trials at once in one batched
network pass (:func:`run_trials_batched`). On 2 CPU cores at the CPU profile's size (64², width
32) four members ran 2.0× the iterations per second of four single fits, at width 128 only 1.1×
(compute-bound; ``bench/results.json``).

A file path wins when both exist. Every invocation runs ``--trials`` more trials of the study
(created or resumed, :mod:`pipeline.tuning`) and writes the best values so far to
``tuned/TASK/<variant>/<name>/`` (``--out``): ``values.yaml`` (what a ``tuned`` fit setting reads,
see :func:`pipeline.settings.fit_settings`), ``trials.csv`` and ``summary.json``. MLflow: a parent
run per study in the experiment ``tune-TASK`` and a child run per trial with its curves.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import optuna
from optuna.trial import TrialState

from pipeline.batched import MemberView, fit_batched
from pipeline.errors import UserError
from pipeline.fit import TASK_DEFAULTS, FitConfig
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import TUNED_VALUES, prepared_dir, tuned_dir
from pipeline.observations import read_observation
from pipeline.problem import Problem, observed, simulate
from pipeline.results import write_json
from pipeline.settings import (
    TASK_VARIANTS,
    fit_settings,
    load_params,
    parse_variant,
    task_variants,
    variant_name,
    write_params_atomic,
)
from pipeline.storage import redact, resolve_storage
from pipeline.tracking import client, experiment_id, git_commit, log_fit_run, repo_root
from pipeline.tuning import (
    BASELINE_ATTR,
    UID_ATTR,
    Objective,
    TrialOutcome,
    TuneConfig,
    as_fit_settings,
    best_values,
    open_study,
    run_trials,
    study_report,
    suggest,
)
from stages.fit import csv_floats, pop_task_options
from stages.optimize import _overrides

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PIPELINE_KEYS = ("task", "variant", "images", "method", "settings", "batch")
"""Keys of params.yaml's ``tune`` section: the DVC stage's, ``settings`` (a
:class:`~pipeline.tuning.TuneConfig`) and ``batch`` (trials per batched pass)."""
DEFAULT_METHOD = "lipschitz"
FIT_OPTIONS = (
    "iterations",
    "lr",
    "width",
    "depth",
    "lam",
    "upsample",
    "seed",
    "device",
    "measure_every",
    "log_every",
)
SCORE_COLUMNS = (
    "value",
    "psnr_stop",
    "holdout_psnr_stop",
    "stop_iteration",
    "iterations_run",
    "pruned_at",
    "wall_time_s",
)


def _ranges(items: tuple[str, ...]) -> dict[str, list[float]]:
    parsed = {}
    for item in items:
        name, sep, bounds = item.partition("=")
        low, colon, high = bounds.partition(":")
        try:
            if not sep or not colon:
                raise ValueError
            parsed[name] = [float(low), float(high)]
        except ValueError as err:
            raise click.BadParameter(
                f"expected NAME=LOW:HIGH, got {item!r}", param_hint="--range"
            ) from err
    return parsed


def _digest(problem: Problem) -> str:
    return hashlib.sha256(problem.observation.float().cpu().numpy().tobytes()).hexdigest()


def _standalone(
    task: str,
    image: Path,
    is_observed: bool,
    task_params: dict[str, Any],
    mask: Path | None,
    channels: int | None,
) -> tuple[Problem, str]:
    make = observed if is_observed else simulate
    problem = make(task, image, task_params, mask, channels)
    key = TASK_VARIANTS.get(task)
    # A photo's variant is what the user says it is; a simulated one's is the operator's.
    value = (
        None if key is None else task_params.get(key) if is_observed else getattr(problem.task, key)
    )
    return problem, variant_name(task, value)


def _tune_section(params: dict[str, Any]) -> dict[str, Any]:
    section = dict(params.get("tune") or {})
    unknown = set(section) - set(PIPELINE_KEYS)
    if unknown:
        raise UserError(f"params.yaml tune has unknown key(s): {', '.join(sorted(unknown))}")
    return section


class StudyTracker:
    """MLflow for one study: a parent run shared by every worker and resumption of the study
    (found by the study's unique id tag), a child run per trial with its curves and params."""

    def __init__(
        self,
        study: optuna.Study,
        experiment: str,
        tags: dict[str, Any],
        params: dict[str, Any],
    ) -> None:
        root = repo_root()
        self.mlflow: MlflowClient = client(root)
        self.experiment = experiment_id(self.mlflow, experiment, root)
        self.tags = {
            "optuna_study": study.study_name,
            "optuna_study_uid": study.user_attrs[UID_ATTR],
            **tags,
        }
        self.parent = self._parent(params)

    def _find(self) -> list[Any]:
        uid = self.tags["optuna_study_uid"]
        return list(
            self.mlflow.search_runs(
                [self.experiment],
                filter_string=f"tags.optuna_study_uid = '{uid}' and tags.stage = 'tune'",
                order_by=["attributes.start_time ASC"],
            )
        )

    def _parent(self, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        found = self._find()
        if found:
            run_id = found[0].info.run_id
            self.mlflow.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"stage": "tune", "git_commit": git_commit(), **self.tags}
        run = self.mlflow.create_run(
            self.experiment,
            run_name=f"tune {self.tags['optuna_study']}",
            tags={k: str(v) for k, v in tags.items()},
        )
        mine = run.info.run_id
        # Workers starting together may each create one: the earliest is the study's parent.
        earliest = self._find()[0].info.run_id
        if earliest != mine:
            self.mlflow.delete_run(mine)
            return earliest
        items = sorted(params.items())
        self.mlflow.log_batch(mine, params=[Param(k, str(v)[:6000]) for k, v in items])
        return mine

    def log_trial(self, outcome: TrialOutcome, image: str) -> None:
        tags = {
            **self.tags,
            "optuna_trial": outcome.number,
            "image": image,
            "trial_state": "PRUNED" if outcome.pruned else "COMPLETE",
        }
        params = {"trial": outcome.number, **outcome.config.flat()}
        metrics = {k: v for k, v in outcome.scores.items() if isinstance(v, int | float)}
        if outcome.value is not None:
            metrics["objective"] = outcome.value
        run_id = log_fit_run(
            self.mlflow,
            self.experiment,
            self.parent,
            f"trial {outcome.number}",
            params,
            tags,
            outcome.curves,
            metrics,
            [],
        )
        if outcome.pruned:
            self.mlflow.set_terminated(run_id, "KILLED")

    def finish(self, report: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric

        values = {k: report[k] for k in ("trials", "complete", "pruned", "failed")}
        if "best" in report:
            values["best_value"] = report["best"]["value"]
            values.update({f"best_{k}": v for k, v in report["best"]["params"].items()})
        agreement = report.get("agreement") or {}
        if agreement.get("spearman") is not None:
            values["spearman"] = agreement["spearman"]
        if "psnr_lost_db" in agreement:
            values["psnr_lost_db"] = agreement["psnr_lost_db"]
        step = int(report["trials"])
        metrics = [Metric(k, float(v), 0, step) for k, v in sorted(values.items())]
        self.mlflow.log_batch(self.parent, metrics=metrics)
        self.mlflow.set_terminated(self.parent, status)


def _trials_csv(study: optuna.Study, search: tuple[str, ...]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", "baseline", *search, *SCORE_COLUMNS])
    for trial in study.get_trials(deepcopy=False):
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        # A pruned trial's value is its last intermediate one: not a score at the stop.
        attrs = {**trial.user_attrs, "value": trial.value if complete else None}
        row = [trial.number, trial.state.name, bool(attrs.get(BASELINE_ATTR, False))]
        row += [trial.params.get(name, "") for name in search]
        row += ["" if attrs.get(key) is None else attrs[key] for key in SCORE_COLUMNS]
        writer.writerow(row)
    return buffer.getvalue().encode()


def write_outputs(
    out: Path, study: optuna.Study, config: TuneConfig, depth: int, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ``values.yaml`` (the best values), ``trials.csv`` and ``summary.json``; return the
    study report."""
    report = study_report(study)
    values = best_values(study, depth)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Tuned by sdip tune: study {study.study_name}, objective {config.objective}, "
        f"best of {report['complete']} complete trial(s) (trial {report['best']['trial']}).\n"
    )
    write_params_atomic(out / TUNED_VALUES, values, header)
    write_bytes_atomic(out / "trials.csv", _trials_csv(study, config.search))
    write_json(out / "summary.json", {**info, "values": values, **report})
    return report


def _batched_round(
    objective: Objective, asked: list[optuna.Trial], study: optuna.Study, told: set[int]
) -> None:
    """Fit the ``asked`` trials in one batched pass and tell the study each outcome; the
    numbers of the trials told are added to ``told``."""
    values = [suggest(trial, objective.config) for trial in asked]
    depth = objective.base.model.depth
    configs = [
        FitConfig.from_dict({**objective.settings, **as_fit_settings(v, depth)}) for v in values
    ]
    pruned_at: dict[int, int] = {}

    def report(view: MemberView) -> bool:
        trial = asked[view.member]
        trial.report(objective.current(view), view.iteration)  # type: ignore[arg-type]
        if objective.config.prune and not view.stopped and trial.should_prune():
            pruned_at[view.member] = view.iteration
            return True
        return False

    results = fit_batched(
        [objective.observation] * len(asked),
        objective.task,
        configs,
        [report],
        cleans=[objective.problem.clean] * len(asked),
    )
    for member, trial in enumerate(asked):
        config, result = configs[member], results[member]
        if member in pruned_at:
            trial.set_user_attr("pruned_at", pruned_at[member])
            attrs = {"pruned_at": pruned_at[member]}
            objective._emit(trial, values[member], config, result.curves, attrs)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, objective.score(trial, values[member], config, result))
        told.add(trial.number)


def run_trials_batched(study: optuna.Study, objective: Objective, trials: int, batch: int) -> None:
    """:func:`~pipeline.tuning.run_trials`, ``batch`` trials at a time: asked together, fitted in
    one batched pass (:func:`pipeline.batched.fit_batched`) and told one by one. A trial that its
    pruner ends leaves the batch while the others go on. The sampler proposes a round's trials
    before it has seen their scores, so a batched study draws other values than a sequential
    one; the members of a batch share the learning rate, so ``lr`` cannot be searched."""
    if "lr" in objective.config.search:
        raise UserError("batched trials share the learning rate: search lam or gauss_sigma only")
    if objective.config.baseline:
        fixed = objective.baseline()
        if fixed is not None:
            study.enqueue_trial(fixed, user_attrs={BASELINE_ATTR: True}, skip_if_exists=True)
    for first in range(0, trials, batch):
        asked = [study.ask() for _ in range(min(batch, trials - first))]
        told: set[int] = set()
        try:
            _batched_round(objective, asked, study, told)
        finally:
            # A round that raised leaves its untold trials failed, not running forever.
            for trial in asked:
                if trial.number not in told:
                    study.tell(trial, state=TrialState.FAIL)


def _trial_line(outcome: TrialOutcome) -> str:
    values = ", ".join(f"{k}={v:.4g}" for k, v in outcome.values.items())
    if outcome.pruned:
        return f"trial {outcome.number}: {values} pruned at iteration {outcome.scores['pruned_at']}"
    stop = outcome.scores["stop_iteration"]
    where = f"stop {stop}" if stop is not None else "no stop (budget)"
    return f"trial {outcome.number}: {values} -> {outcome.value:.3f} dB ({where})"


@click.command("tune")
@click.argument("task", type=click.Choice(sorted(TASK_DEFAULTS)))
@click.argument("image")
@click.option("--trials", type=int, help="Trials to run in this process (default 20).")
@click.option("--batch", type=int, help="Trials fitted together in one batched pass (1).")
@click.option("--objective", type=click.Choice(["oracle", "holdout"]), help="Default: holdout.")
@click.option("--search", help="Settings to search, comma-separated: lam, lr, gauss_sigma.")
@click.option("--range", "ranges", multiple=True, help="Search range: NAME=LOW:HIGH (log scale).")
@click.option("--holdout", type=float, help="Fraction of observed pixels held out (0.1).")
@click.option("--holdout-seed", type=int, help="Seed of the held-out pixels (0).")
@click.option("--sampler-seed", type=int, help="TPE seed (0); give each worker its own.")
@click.option("--startup-trials", type=int, help="Random trials before TPE (5).")
@click.option("--prune/--no-prune", default=None, help="Median pruning (on).")
@click.option("--prune-startup", type=int, help="Trials finished before pruning starts (4).")
@click.option("--prune-warmup", type=int, help="First iteration that may be pruned (budget/4).")
@click.option("--baseline/--no-baseline", default=None, help="Run the fixed λ first (on).")
@click.option(
    "--storage", help="sqlite:///… (default <repo>/optuna.db), journal:PATH, memory, postgresql://…"
)
@click.option("--study-name", help="Default: TASK-<variant>-<image>-<objective>.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Default: tuned/TASK/<variant>/<image>.",
)
@click.option("--variant", "variant_value", help="Prepared observation's variant (25 or sigma25).")
@click.option("--method", help="Prepared: the params.yaml method whose settings are tuned.")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--set", "overrides", multiple=True, help="Prepared: override a fit setting.")
@click.option("--observed", "is_observed", is_flag=True, help="IMAGE file is already degraded.")
@click.option("--sigma", type=float, help="Noise level on the 0–255 scale (denoising).")
@click.option("--quality", type=int, help="JPEG quality (deblocking).")
@click.option("--p", type=float, help="Kept fraction of a Bernoulli mask (inpainting).")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), help="Inpainting mask.")
@click.option("--factor", type=int, help="Super-resolution factor (sr).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Force grey (1) or RGB (3).")
@click.option("--iterations", type=int, help="Iteration budget.")
@click.option("--lr", type=float, help="Adam learning rate.")
@click.option("--width", type=int, help="Decoder channels.")
@click.option("--depth", type=int, help="Upsampling blocks.")
@click.option("--lam", type=float, help="The fixed λ (the baseline trial).")
@click.option("--upsample", type=click.Choice(["bilinear", "nearest", "deconv", "gaussian"]))
@click.option("--gauss-sigma", help="Gaussian upsampling σ per block, comma-separated.")
@click.option("--seed", type=int, help="Seed of every trial's fit (network init and input).")
@click.option("--device", help="auto, cpu, cuda, cuda:1, …")
@click.option("--measure-every", type=int, help="Measure every N iterations.")
@click.option("--log-every", type=int, help="Report to the pruner every N iterations.")
@click.option("--dvc-stage", default="", help="The DVC stage name, recorded as a tag.")
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def tune_command(
    task: str,
    image: str,
    ranges: tuple[str, ...],
    storage: str | None,
    study_name: str | None,
    out_dir: Path | None,
    variant_value: str | None,
    method: str | None,
    params_file: str,
    overrides: tuple[str, ...],
    is_observed: bool,
    mask: Path | None,
    channels: str | None,
    gauss_sigma: str | None,
    dvc_stage: str,
    track: bool,
    **options: Any,
) -> None:
    """Tune λ (and optionally lr, Gaussian σ) of TASK for IMAGE with an Optuna study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task_params = pop_task_options(task, options)
    batch = options.pop("batch")
    fit_values = {k: options.pop(k) for k in FIT_OPTIONS}
    fit_values = {k: v for k, v in fit_values.items() if v is not None}
    if gauss_sigma is not None:
        fit_values["gauss_sigma"] = csv_floats(gauss_sigma)
    tune_values = {k: v for k, v in options.items() if v is not None}
    if ranges:
        tune_values["ranges"] = _ranges(ranges)
    path = Path(image)
    profile = "standalone"
    if path.is_file():
        if method is not None or overrides or variant_value is not None:
            raise click.UsageError("--method, --set and --variant apply to prepared observations")
        problem, variant = _standalone(
            task, path, is_observed, task_params, mask, None if channels is None else int(channels)
        )
        name = path.stem
        settings = {**TASK_DEFAULTS[task], **fit_values}
        config = TuneConfig.from_dict(tune_values)
    else:
        if task_params or mask is not None or is_observed or channels is not None:
            raise click.UsageError(
                f"{image!r} is not a file; the degradation of a prepared observation is frozen, "
                "so --observed, --channels and the task options do not apply"
            )
        params = load_params(params_file)
        section = _tune_section(params)
        if variant_value is None and TASK_VARIANTS.get(task):
            variant_value = str(task_variants(params, task)[0])
        variant = variant_name(task, parse_variant(task, variant_value))
        folder = prepared_dir(task, variant, image)
        if not folder.is_dir():
            raise UserError(
                f"IMAGE {image!r} is neither an image file nor a prepared observation ({folder})"
            )
        problem, _ = read_observation(folder)
        name = image
        method = method or section.get("method") or DEFAULT_METHOD
        settings = fit_settings(
            params, task, method, image, variant, {**_overrides(overrides), **fit_values}
        )
        profile = params.get("profile", "custom")
        config = TuneConfig.from_dict({**(section.get("settings") or {}), **tune_values})
        batch = section.get("batch", 1) if batch is None else batch
    batch = 1 if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"tune batch must be an integer >= 1, got {batch!r}")
    objective_settings = {k: v for k, v in settings.items() if k != "device"}
    study_id = study_name or f"{task}-{variant}-{name}-{config.objective}"
    fingerprint = {
        "task": task,
        "variant": variant,
        "image": name,
        "observation_sha256": _digest(problem),
        "objective": config.objective,
        "search": {n: list(config.ranges[n]) for n in config.search},
        "holdout": [config.holdout, config.holdout_seed] if config.objective == "holdout" else None,
        "fit": objective_settings,
    }
    objective = Objective(problem, settings, config)
    store = resolve_storage(storage)
    study, created = open_study(study_id, store, config, objective.base.iterations, fingerprint)
    where = redact(storage) if storage else str(store)
    done = len(study.trials)
    click.echo(
        f"study {study_id} ({'new' if created else f'resumed, {done} trial(s)'}) in {where}: "
        f"{config.trials} trial(s), objective {config.objective}, search "
        + ", ".join(
            f"{n} in [{config.ranges[n][0]:g}, {config.ranges[n][1]:g}]" for n in config.search
        )
    )
    tracker = None
    if track:
        tags = {
            "task": task,
            "image": name,
            "variant": variant,
            "objective": config.objective,
            "optuna_storage": where,
            "profile": profile,
            "dvc_stage": dvc_stage,
        }
        study_params = {
            **{f"tune.{k}": v for k, v in vars(config).items()},
            **objective.base.flat(),
        }
        tracker = StudyTracker(study, f"tune-{task}", tags, study_params)

    def on_trial(outcome: TrialOutcome) -> None:
        click.echo(_trial_line(outcome))
        if tracker is not None:
            tracker.log_trial(outcome, name)

    objective.on_trial = on_trial
    out = out_dir or tuned_dir(task, variant, name)
    info = {
        "task": task,
        "variant": variant,
        "image": name,
        "storage": where,
        "objective": config.objective,
    }
    status = "FAILED"
    try:
        if batch > 1:
            run_trials_batched(study, objective, config.trials, batch)
        else:
            run_trials(study, objective, config.trials)
        report = write_outputs(out, study, config, objective.base.model.depth, info)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(study_report(study), status)
    best = report["best"]
    line = (
        f"{report['trials']} trial(s): {report['complete']} complete, {report['pruned']} pruned, "
        f"{report['failed']} failed; best trial {best['trial']} "
        + ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
        + f" -> {best['value']:.3f} dB"
    )
    if "baseline" in report:
        line += f" (fixed: {report['baseline']['value']:.3f} dB)"
    agreement = report.get("agreement")
    if agreement and agreement["spearman"] is not None:
        line += (
            f"; holdout vs oracle: Spearman {agreement['spearman']:.2f}, "
            f"{agreement['psnr_lost_db']:.2f} dB lost"
        )
    click.echo(line)
    click.echo(f"wrote {out / TUNED_VALUES}")
