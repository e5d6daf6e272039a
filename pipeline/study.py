"""One tuning study from start to outputs (``sdip tune``): open or resume it, track it in MLflow,
run its trials, and write ``values.yaml``, ``trials.csv`` and ``summary.json``.

The objective, the search space, the storages and the trial loop are :mod:`pipeline.tuning`'s;
this module puts them together for a command, so the command only says what to tune.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from pipeline.credentials import redact
from pipeline.fit import FitConfig
from pipeline.imageio import write_bytes_atomic
from pipeline.layout import TUNED_VALUES, checkpoint_path
from pipeline.problem import Problem
from pipeline.results import write_json
from pipeline.settings import write_params_atomic
from pipeline.storage import resolve_storage
from pipeline.study_tracking import StudyTracker
from pipeline.tuning import (
    BASELINE_ATTR,
    Objective,
    TrialOutcome,
    TuneConfig,
    best_values,
    open_study,
    run_trials,
    study_report,
)

SCORE_COLUMNS = (
    "value",
    "psnr_stop",
    "holdout_psnr_stop",
    "holdout_psnr_fold_std",
    "stop_iteration",
    "iterations_run",
    "pruned_at",
    "wall_time_s",
)
"""Per-trial columns of ``trials.csv`` after the searched values."""


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
    out: Path, study: optuna.Study, config: TuneConfig, base: FitConfig, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ``values.yaml`` (the best values), ``trials.csv`` and ``summary.json``; return the
    study report."""
    report = study_report(study)
    values = best_values(study, base.model.depth)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Tuned by sdip tune: study {study.study_name}, objective {config.objective}, "
        f"best of {report['complete']} complete trial(s) (trial {report['best']['trial']}).\n"
    )
    write_params_atomic(out / TUNED_VALUES, values, header)
    write_bytes_atomic(out / "trials.csv", _trials_csv(study, config.search))
    write_json(out / "summary.json", {**info, "values": values, **report})
    return report


def holdout_draw(config: TuneConfig) -> list[float | int] | None:
    """The held-out pixels a study's scores rest on: fraction and seed, and the folds when more
    than one (so studies made before folds existed still resume)."""
    if config.objective != "holdout":
        return None
    draw: list[float | int] = [config.holdout, config.holdout_seed]
    return [*draw, config.folds] if config.folds > 1 else draw


def study_fingerprint(
    problem: Problem, config: TuneConfig, settings: dict[str, Any], where: dict[str, str]
) -> dict[str, Any]:
    """What a study's scores mean, recorded on a new study and checked when one is resumed
    (:func:`open_study`): ``where`` (task, variant, image), the observation's sha256, the
    objective, the search space, the holdout draw and the fit settings (all but the device)."""
    observation = problem.observation.float().cpu().numpy().tobytes()
    return {
        **where,
        "observation_sha256": hashlib.sha256(observation).hexdigest(),
        "objective": config.objective,
        "search": {n: list(config.ranges[n]) for n in config.search},
        "holdout": holdout_draw(config),
        "fit": {k: v for k, v in settings.items() if k != "device"},
    }


def trial_line(outcome: TrialOutcome) -> str:
    """One line for a finished or pruned trial."""
    values = ", ".join(f"{k}={v:.4g}" for k, v in outcome.values.items())
    if outcome.pruned:
        return f"trial {outcome.number}: {values} pruned at iteration {outcome.scores['pruned_at']}"
    stop = outcome.scores["stop_iteration"]
    where = f"stop {stop}" if stop is not None else "no stop (budget)"
    return f"trial {outcome.number}: {values} -> {outcome.value:.3f} dB ({where})"


def report_line(report: dict[str, Any]) -> str:
    """One line for a study's :func:`study_report`: counts, best trial, fixed trial, agreement."""
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
    return line


def run_study(
    problem: Problem,
    settings: dict[str, Any],
    config: TuneConfig,
    where: dict[str, str],
    out: Path,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    batch: int = 1,
    checkpoint_every: int | None = None,
    tracking: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Open (or resume) the study of ``problem`` and run ``config.trials`` more trials, ``batch``
    at a time; write its outputs to ``out`` and return :func:`~pipeline.tuning.study_report`.

    With ``checkpoint_every``, each round of trials checkpoints its fits every that many
    iterations (and on SIGTERM/SIGINT) under ``.checkpoints/<out>/round.pt``, and an interrupted
    round resumes when the same study runs again (:func:`pipeline.tuning.run_trials`).
    ``where`` names the problem (``task``, ``variant``, ``image``, in that order: the default
    study name joins them with the objective); ``tracking`` (None: no MLflow) holds the
    tags of the study's MLflow parent run; ``echo`` receives one line per event.
    """
    objective = Objective(problem, settings, config)
    if checkpoint_every is not None:
        objective.checkpoint = checkpoint_path(out / "round")
        objective.checkpoint_every = checkpoint_every
    base = objective.base
    study_id = (
        study_name or f"{where['task']}-{where['variant']}-{where['image']}-{config.objective}"
    )
    store = resolve_storage(storage)
    fingerprint = study_fingerprint(problem, config, settings, where)
    study, created = open_study(study_id, store, config, base.iterations, fingerprint)
    shown = redact(storage) if storage else str(store)
    echo(study_line(study_id, created, len(study.trials), shown, config))
    tracker = None
    if tracking is not None:
        tags = {**where, "objective": config.objective, "optuna_storage": shown, **tracking}
        params = {**{f"tune.{k}": v for k, v in vars(config).items()}, **base.flat()}
        tracker = StudyTracker(study, f"tune-{where['task']}", tags, params, out)

    def on_trial(outcome: TrialOutcome) -> None:
        echo(trial_line(outcome))
        if tracker is not None:
            tracker.log_trial(outcome, where["image"])

    objective.on_trial = on_trial
    status = "FAILED"
    try:
        run_trials(study, objective, config.trials, batch)
        info = {**where, "storage": shown, "objective": config.objective}
        report = write_outputs(out, study, config, base, info)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(study_report(study), status)
    echo(report_line(report))
    return report


def study_line(name: str, created: bool, done: int, storage: str, config: TuneConfig) -> str:
    """The first line of a study: new or resumed, where, how many trials, what it searches."""
    resumed = "new" if created else f"resumed, {done} trial(s)"
    search = ", ".join(
        f"{n} in [{config.ranges[n][0]:g}, {config.ranges[n][1]:g}]" for n in config.search
    )
    return (
        f"study {name} ({resumed}) in {storage}: {config.trials} trial(s), objective "
        f"{config.objective}, search {search}"
    )
