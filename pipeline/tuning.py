"""Per-image tuning of λ (and optionally the learning rate and the Gaussian σ) with Optuna.

The paper's README says λ "should be tuned for each input image" (method.md §2) and gives no tool;
this module is that tool. One Optuna trial is one fit (:func:`pipeline.fit.fit_many`) with suggested
settings, ended by the ratio rule (method.md §5; the budget when it never fires) and scored there
by one of two objectives:

- ``oracle``: ``PSNR(x_stop, x)`` against the clean image ``x`` (research tables; needs ``x``);
- ``holdout``: ground-truth free. A seeded random fraction ``ρ`` of the observed pixels ``H`` is
  left out of the loss (:class:`HoldoutDegradation`) and the fit is scored on them,
  ``PSNR_H = 10·log10(1 / MSE_H)``, ``MSE_H = Σ_{p∈H} Σ_c (A'(x_stop) − y)²_{c,p} / (C·|H|)``.
  For white noise the held-out error is the error against the clean image plus σ², so its ranking
  of the trials estimates the oracle's (it is a cross-validation of the fit); for correlated
  errors (JPEG blocks) it is only a proxy. With ``folds`` F > 1 each trial fits F disjoint
  hold-outs (folds 0 … F−1 of one seeded permutation, as F members of the same engine pass) and
  is scored by ``10·log10(1 / mean_f MSE_{H_f})``; the folds' spread is recorded. One fold's
  noise can exceed the differences between candidates on small images
  (experiments/unseen/README.md: 3 folds lost 0.53 dB against the oracle λ where one lost 1.15).

Intermediate values (the current oracle or held-out PSNR every ``log_every`` iterations) are
reported to the trial, so a pruner (median by default) can end hopeless trials early; a pruned
trial keeps its partial curves and is counted as such.

Storage: :func:`pipeline.storage.resolve_storage` (SQLite by default, a journal file, memory, or
a database server shared by workers on several machines). Studies are resumable; a study
remembers the settings it was made with and refuses to continue under others.
"""

from __future__ import annotations

import json
import math
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from scipy.stats import rankdata
from sqlalchemy.exc import SQLAlchemyError
from torch import Tensor

from pipeline.checkpoint import checkpoint_for, saved_meta
from pipeline.credentials import redact
from pipeline.degradations import Degradation
from pipeline.errors import UserError, check_bool, check_choice, check_int, check_number
from pipeline.fit import FitConfig, MemberView, fit_many
from pipeline.layout import CHECKPOINT_EVERY
from pipeline.problem import Problem
from pipeline.results import FitResult
from pipeline.storage import fail_stale, heartbeat

OBJECTIVES = ("oracle", "holdout")
SEARCHABLE = ("lam", "lr", "gauss_sigma")
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "lam": (0.3, 3.0),
    "lr": (1e-4, 1e-2),
    "gauss_sigma": (0.1, 1.5),
}
"""Log-uniform search ranges. λ spans the paper's values (1.0–2.0 at width 128) and the smaller
ones a narrow decoder needs; ``gauss_sigma`` is one σ for every block (as the σ figure)."""

SETTINGS_ATTR = "settings"
UID_ATTR = "uid"
BASELINE_ATTR = "baseline"
UID_WAIT_S = 10.0


class HoldoutDegradation(Degradation):
    """``task`` with a seeded random fraction of its observed pixels held out of the loss.

    Of the pixels that take part in the loss (all of them, or the kept ones of an inpainting
    mask), ``round(fraction·n)`` are drawn without replacement on the CPU from a generator seeded
    with ``seed``; one draw is shared by all channels. The fit sees ``y·k`` with the mask
    ``k = m·(1 − h)`` (``m`` the task's own mask, ``h`` the held-out pixels), exactly as an
    inpainting problem, so its loss, observation PSNR and backtracking ignore ``h``.
    :meth:`holdout_psnr` scores an output on ``h`` against the full observation. ``fold`` f
    holds out the f-th block of ``round(fraction·n)`` pixels of one seeded permutation, so folds
    0, 1, … of one seed are disjoint (k-fold cross-validation, k ≤ 1/fraction).

    ``observed`` (1, 1, h, w), when a photo was padded to the network's size
    (:meth:`pipeline.problem.Problem.observed_mask`), is 1 on the photo: only its pixels may be
    held out, and the padding is left out of the loss too, since it mirrors the photo and would
    show the fit the held-out values.
    """

    def __init__(
        self,
        task: Degradation,
        observation: Tensor,
        fraction: float = 0.1,
        seed: int = 0,
        fold: int = 0,
        observed: Tensor | None = None,
    ) -> None:
        if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
            raise UserError(f"holdout fraction must be in (0, 1), got {fraction!r}")
        if not task.holds_out:
            raise UserError(f"{task.name} fits the clean image itself: it has nothing to hold out")
        self.task = task
        self.y = observation.detach().to("cpu", torch.float32)
        height, width = self.y.shape[-2:]
        own = task.loss_mask(self.y)
        eligible = torch.ones(height * width) if own is None else own.reshape(-1).cpu()
        if observed is not None:
            eligible = eligible * observed.reshape(-1).cpu()
        candidates = torch.nonzero(eligible > 0.5).flatten()
        count = round(float(fraction) * candidates.numel())
        if not 1 <= count < candidates.numel():
            raise UserError(
                f"holdout fraction {fraction} of {candidates.numel()} observed pixels holds out "
                f"{count}; choose one that holds out at least one pixel and keeps one"
            )
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise UserError(f"holdout fold must be a non-negative integer, got {fold!r}")
        if (fold + 1) * count > candidates.numel():
            raise UserError(
                f"holdout fold {fold} of fraction {fraction} needs {(fold + 1) * count} of the "
                f"{candidates.numel()} observed pixels; folds 0..{candidates.numel() // count - 1}"
                " exist"
            )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(candidates.numel(), generator=generator)
        chosen = candidates[order[fold * count : (fold + 1) * count]]
        held = torch.zeros(height * width)
        held[chosen] = 1.0
        self.held = held.reshape(1, 1, height, width)
        self.keep = eligible.reshape(1, 1, height, width) * (1.0 - self.held)

    @property
    def backtracks(self) -> bool:  # type: ignore[override]
        """The wrapped task's backtracking: the held-out pixels change what is fitted, not how."""
        return self.task.backtracks

    @property
    def observation(self) -> Tensor:
        """What the fit is given: the observation with the held-out pixels zeroed."""
        return self.y * self.keep

    def observe(self, x: Tensor) -> Tensor:
        return self.task.observe(x) * self.keep.to(x.device, x.dtype)

    def forward(self, out: Tensor) -> Tensor:
        return self.task.forward(out)

    def loss_mask(self, y: Tensor) -> Tensor:
        return self.keep.to(y.device, y.dtype)

    def output_shape(self, y: Tensor) -> tuple[int, int]:
        return self.task.output_shape(y)

    def restore(self, out: Tensor, y: Tensor) -> Tensor:
        return self.task.restore(out, y)

    def holdout_psnr(self, out: Tensor) -> float:
        """``10·log10(1 / MSE_H)`` of ``A'(out)`` against the full observation on the held-out
        pixels (module docstring); ``inf`` for a perfect prediction."""
        with torch.no_grad():
            pred = self.task.forward(out).float()
            y = self.y.to(pred.device)
            held = self.held.to(pred.device)
            error = ((pred - y).square() * held).sum() / (held.sum() * y.shape[-3])
        mse = float(error)
        return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass(frozen=True)
class TuneConfig:
    """How one study searches: objective, trial count, search space, holdout, sampler, pruner.

    ``ranges`` maps a searched setting to its log-uniform ``(low, high)``; ``startup_trials``
    are TPE's random trials; ``prune_startup`` trials must finish before the median pruner acts,
    and it prunes from iteration ``prune_warmup`` on (``None``: a quarter of the budget).
    ``baseline`` runs the fixed setting (the profile's λ) as the study's first trial. ``folds``
    disjoint hold-outs are fitted and averaged per trial (module docstring).
    """

    objective: str = "holdout"
    trials: int = 20
    search: tuple[str, ...] = ("lam",)
    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))
    holdout: float = 0.1
    holdout_seed: int = 0
    folds: int = 1
    sampler_seed: int = 0
    startup_trials: int = 5
    prune: bool = True
    prune_startup: int = 4
    prune_warmup: int | None = None
    baseline: bool = True

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        unknown = [name for name in (*self.search, *self.ranges) if name not in SEARCHABLE]
        if unknown:
            raise UserError(
                f"cannot search {', '.join(unknown)}; searchable: {', '.join(SEARCHABLE)}"
            )
        if not self.search or len(set(self.search)) != len(self.search):
            raise UserError(f"search must name distinct settings, got {list(self.search)}")
        for name, bounds in self.ranges.items():
            low, high = (check_number(f"range of {name}", v, above=0) for v in bounds)
            if not low < high:
                raise UserError(f"range of {name} must satisfy 0 < low < high, got {bounds}")
        check_int("trials", self.trials, 1)
        check_number("holdout", self.holdout, above=0, below=1)
        check_int("holdout_seed", self.holdout_seed, 0)
        check_int("folds", self.folds, 1)
        check_int("sampler_seed", self.sampler_seed, 0)
        check_int("startup_trials", self.startup_trials, 0)
        check_bool("prune", self.prune)
        check_int("prune_startup", self.prune_startup, 0)
        if self.prune_warmup is not None:
            check_int("prune_warmup", self.prune_warmup, 0)
        check_bool("baseline", self.baseline)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TuneConfig:
        """Build from a flat mapping (params.yaml ``tune``, CLI); unknown keys are a
        :class:`UserError`. ``search`` may be a list or a comma-separated string; ``ranges``
        entries may give only some settings (the others keep :data:`DEFAULT_RANGES`)."""
        own = {f.name for f in fields(cls)}
        unknown = set(values) - own
        if unknown:
            raise UserError(f"unknown tune setting(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        search = values.get("search")
        if isinstance(search, str):
            values["search"] = tuple(s.strip() for s in search.split(",") if s.strip())
        elif isinstance(search, list | tuple):
            values["search"] = tuple(search)
        elif search is not None:
            raise UserError(f"tune search must be a list of settings, got {search!r}")
        ranges = values.get("ranges") or {}
        if not isinstance(ranges, dict):
            raise UserError(f"tune ranges must map a setting to [low, high], got {ranges!r}")
        for name, bounds in ranges.items():
            if not isinstance(bounds, list | tuple) or len(bounds) != 2:
                raise UserError(f"range of {name} must be [low, high], got {bounds!r}")
        values["ranges"] = {**DEFAULT_RANGES, **{k: tuple(v) for k, v in ranges.items()}}
        return cls(**values)

    def warmup(self, iterations: int) -> int:
        return iterations // 4 if self.prune_warmup is None else self.prune_warmup


def is_gaussian(settings: dict[str, Any]) -> bool:
    upsample = settings.get("upsample", "bilinear")
    kinds = [upsample] if isinstance(upsample, str) else list(upsample)
    return "gaussian" in kinds


def suggest(trial: optuna.Trial, config: TuneConfig) -> dict[str, float]:
    """The trial's values of the searched settings (log-uniform over their ranges)."""
    return {
        name: trial.suggest_float(name, *config.ranges[name], log=True) for name in config.search
    }


def as_fit_settings(values: dict[str, float], depth: int) -> dict[str, Any]:
    """Searched values → fit settings: one Gaussian σ becomes the same σ for every block."""
    settings: dict[str, Any] = dict(values)
    if "gauss_sigma" in settings:
        settings["gauss_sigma"] = [float(settings["gauss_sigma"])] * depth
    return settings


@dataclass
class TrialOutcome:
    """What one finished or pruned trial produced (for tracking hooks)."""

    number: int
    values: dict[str, float]
    config: FitConfig
    curves: dict[str, np.ndarray]
    scores: dict[str, Any]
    value: float | None
    pruned: bool


def mean_psnr(psnrs: Sequence[float]) -> float:
    """The PSNR of the mean squared error of several PSNRs (peak 1): ``−10·log10(mean 10^(−p/10))``
    (averaging the errors, not the decibels, as one hold-out of all the folds' pixels would)."""
    return float(-10 * np.log10(np.mean([10 ** (-p / 10) for p in psnrs])))


class Objective:
    """The study's objective: one fit per trial, scored at the ratio-rule stop.

    ``settings`` are the flat fit settings of the tuned fit (a profile method or ``sdip fit``'s
    options); the searched ones are replaced by the trial's suggestions. The fit ends at the stop
    (``halt_at_stop``): the score is taken there, so iterations after it would be wasted.
    ``on_trial`` is called with the :class:`TrialOutcome` of every finished or pruned trial.
    """

    def __init__(
        self,
        problem: Problem,
        settings: dict[str, Any],
        config: TuneConfig,
        on_trial: Callable[[TrialOutcome], None] | None = None,
    ) -> None:
        if config.objective == "oracle" and problem.clean is None:
            raise UserError(
                "the oracle objective needs the clean image; use --objective holdout for a photo"
            )
        if "gauss_sigma" in config.search and not is_gaussian(settings):
            raise UserError(
                "searching gauss_sigma needs the Gaussian upsampler (upsample=gaussian)"
            )
        self.config = config
        self.settings = {**settings, "halt_at_stop": True}
        self.base = FitConfig.from_dict(self.settings)
        self.problem = problem
        self.holdouts: list[HoldoutDegradation] = []
        if config.objective == "holdout":
            observed = None if problem.region is None else problem.observed_mask()
            self.holdouts = [
                HoldoutDegradation(
                    problem.task,
                    problem.observation,
                    config.holdout,
                    config.holdout_seed,
                    fold,
                    observed,
                )
                for fold in range(config.folds)
            ]
        self.on_trial = on_trial
        self.checkpoint: Path | None = None
        """Where a round of trials keeps its fits' state (:mod:`pipeline.checkpoint`); None: no
        checkpoints."""
        self.checkpoint_every = CHECKPOINT_EVERY

    @property
    def fits(self) -> list[tuple[Degradation, Tensor]]:
        """What each member of a trial fits: one hold-out fold each, or the whole observation."""
        if self.holdouts:
            return [(holdout, holdout.observation) for holdout in self.holdouts]
        return [(self.problem.task, self.problem.observation)]

    def baseline(self) -> dict[str, float] | None:
        """The fixed settings' values of the searched settings, if all lie in their ranges."""
        model = self.base.model
        fixed = {"lam": model.lam, "lr": self.base.lr}
        if "gauss_sigma" in self.config.search:
            sigmas = set(model.gauss_sigma)
            if len(sigmas) != 1:
                return None
            fixed["gauss_sigma"] = sigmas.pop()
        values = {name: float(fixed[name]) for name in self.config.search}
        inside = all(
            self.config.ranges[n][0] <= v <= self.config.ranges[n][1] for n, v in values.items()
        )
        return values if inside else None

    def current(self, view: MemberView) -> float:
        """The objective at the last measured iteration of one member, for pruning."""
        if self.holdouts:
            return self.holdouts[view.member % len(self.holdouts)].holdout_psnr(view.last_out)
        return float(view.curves["psnr"][view.measured - 1])

    def run_round(self, asked: list[optuna.Trial], study: optuna.Study, told: set[int]) -> None:
        """Fit the ``asked`` trials together (one engine pass, :func:`pipeline.fit.fit_many`, with
        one member per trial and fold: trial t's fold f is member t·F + f) and tell the study
        each outcome; the numbers of the trials told are added to ``told``. A trial that its
        pruner ends leaves the pass, all its folds, while the others go on. The pruner reads fold
        0 (Optuna takes one intermediate value per trial and step)."""
        values = [suggest(trial, self.config) for trial in asked]
        depth = self.base.model.depth
        fits = self.fits
        folds = len(fits)
        configs = [
            FitConfig.from_dict({**self.settings, **as_fit_settings(v, depth)})
            for v in values
            for _ in fits
        ]
        tasks = [task for _ in asked for task, _ in fits]
        observations = [observation for _ in asked for _, observation in fits]
        checkpoint = None
        if self.checkpoint is not None:
            meta = {
                "trials": [(t.number, v, t.user_attrs) for t, v in zip(asked, values, strict=True)]
            }
            checkpoint = checkpoint_for(
                self.checkpoint, configs, observations, self.checkpoint_every, meta
            )
        pruned_at: dict[int, int] = {}

        def report(view: MemberView) -> bool:
            index, fold = divmod(view.member, folds)
            if fold > 0:
                return index in pruned_at
            trial = asked[index]
            trial.report(self.current(view), view.iteration)
            # Once the rule has fired the fit ends at this sync with its real score.
            if self.config.prune and not view.stopped and trial.should_prune():
                pruned_at[index] = view.iteration
                return True
            return False

        results = fit_many(
            observations,
            tasks,
            configs,
            [report],
            cleans=[self.problem.clean] * len(configs),
            checkpoint=checkpoint,
            region=self.problem.region,
        )
        for index, trial in enumerate(asked):
            config = configs[index * folds]
            own = results[index * folds : (index + 1) * folds]
            if index in pruned_at:
                trial.set_user_attr("pruned_at", pruned_at[index])
                attrs = {"pruned_at": pruned_at[index]}
                self._emit(trial, values[index], config, own[0].curves, attrs)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, self.score(trial, values[index], config, own))
            told.add(trial.number)

    def score(
        self,
        trial: optuna.Trial,
        values: dict[str, float],
        config: FitConfig,
        results: list[FitResult],
    ) -> float:
        """A finished trial's score at its stop (each fold's at its own), recorded on the trial
        and emitted; the fit's own scores are those of the first fold."""
        summary = results[0].summary()
        keys = ("stop_iteration", "iterations_run", "psnr_stop", "psnr_best", "wall_time_s")
        scores: dict[str, Any] = {key: summary[key] for key in keys}
        if self.holdouts:
            psnrs = [
                holdout.holdout_psnr(result.at_stop)
                for holdout, result in zip(self.holdouts, results, strict=True)
            ]
            scores["holdout_psnr_stop"] = mean_psnr(psnrs)
            if len(psnrs) > 1:
                scores["holdout_psnr_folds"] = psnrs
                scores["holdout_psnr_fold_std"] = float(np.std(psnrs))
        value = scores["holdout_psnr_stop" if self.holdouts else "psnr_stop"]
        for key, score in scores.items():
            trial.set_user_attr(key, score)
        self._emit(trial, values, config, results[0].curves, scores, value)
        return value

    def _emit(
        self,
        trial: optuna.Trial,
        values: dict[str, float],
        config: FitConfig,
        curves: dict[str, np.ndarray],
        scores: dict[str, Any],
        value: float | None = None,
    ) -> None:
        if self.on_trial is not None:
            outcome = TrialOutcome(
                trial.number, values, config, curves, scores, value, pruned=value is None
            )
            self.on_trial(outcome)


def fingerprint(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as JSON would return them, so stored and fresh settings compare equal."""
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def open_study(
    name: str,
    storage: str | BaseStorage,
    config: TuneConfig,
    iterations: int,
    settings: dict[str, Any],
) -> tuple[optuna.Study, bool]:
    """Create the study ``name`` or load it to continue; returns ``(study, created)``.

    The sampler is TPE seeded with ``config.sampler_seed`` (give each worker its own seed, or
    workers draw the same random startup trials); the pruner is the median pruner (or none). A new
    study records ``settings`` (what its scores mean) and a unique id; a loaded one must have been
    made with the same ``settings``, else its trials would not be comparable.
    """
    sampler = optuna.samplers.TPESampler(
        seed=config.sampler_seed, n_startup_trials=config.startup_trials
    )
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=config.prune_startup, n_warmup_steps=config.warmup(iterations)
        )
        if config.prune
        else optuna.pruners.NopPruner()
    )
    options = {"study_name": name, "storage": storage, "sampler": sampler, "pruner": pruner}
    created = True
    try:
        try:
            study = optuna.create_study(direction="maximize", load_if_exists=False, **options)
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            study = optuna.load_study(**options)
    except (
        ImportError,
        ValueError,
        SQLAlchemyError,
        optuna.exceptions.StorageInternalError,
    ) as err:
        where = storage if isinstance(storage, str) else type(storage).__name__
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot open Optuna storage {redact(str(where))}: {reason}") from err
    wanted = fingerprint(settings)
    if created:
        study.set_user_attr(SETTINGS_ATTR, wanted)
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        return study, True
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise UserError(f"study {name!r} does not maximise a score; pass another --study-name")
    stored = _wait_for_attrs(study)
    if stored is not None and stored != wanted:
        differ = sorted(k for k in {*stored, *wanted} if stored.get(k) != wanted.get(k))
        raise UserError(
            f"study {name!r} was made with other settings ({', '.join(differ)}); continue it "
            "with the same settings or pass another --study-name"
        )
    return study, False


def _wait_for_attrs(study: optuna.Study) -> dict[str, Any] | None:
    """The stored settings of a study another worker has just created (it writes them right
    after the study); after :data:`UID_WAIT_S` without them, this worker writes the id."""
    deadline = time.monotonic() + UID_WAIT_S
    while True:
        attrs = study.user_attrs
        if UID_ATTR in attrs:
            return attrs.get(SETTINGS_ATTR)
        if time.monotonic() > deadline:
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
            return None
        time.sleep(0.1)


def run_trials(study: optuna.Study, objective: Objective, trials: int, batch: int = 1) -> None:
    """Run ``trials`` more trials of ``study`` in this process, ``batch`` at a time: asked
    together, fitted in one engine pass and told one by one (first the baseline, when asked for
    and not run yet). The sampler proposes a round's trials before it has seen their scores, so a
    batched study draws other values than a sequential one; the members of a pass share the
    learning rate, so ``lr`` cannot be searched with ``batch`` > 1.

    A round interrupted in an earlier process (its checkpoint, ``objective.checkpoint``, is there)
    comes first: its trials, left RUNNING, are failed, and the same values are asked again as new
    trials whose fits resume from the checkpoint. Its trials count toward ``trials``."""
    if batch > 1 and "lr" in objective.config.search:
        raise UserError("batched trials share the learning rate: search lam or gauss_sigma only")
    first_round = _resume_round(study, objective.checkpoint)
    if objective.config.baseline:
        fixed = objective.baseline()
        if fixed is not None:
            study.enqueue_trial(fixed, user_attrs={BASELINE_ATTR: True}, skip_if_exists=True)
    done = 0
    while done < trials:
        size = min(first_round or batch, trials - done)
        first_round = 0
        fail_stale(study)  # trials of workers that died are FAIL, not RUNNING forever
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for study.optimize; here heartbeat() runs them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            asked = [study.ask() for _ in range(size)]
        told: set[int] = set()
        try:
            with heartbeat(study, asked):
                objective.run_round(asked, study, told)
        finally:
            # A round that raised leaves its untold trials failed, not running forever.
            for trial in asked:
                if trial.number not in told:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
        done += size


def _resume_round(study: optuna.Study, checkpoint: Path | None) -> int:
    """Fail the trials of an interrupted round and enqueue their values again; returns how
    many (0 when there is no interrupted round)."""
    meta = None if checkpoint is None else saved_meta(checkpoint)
    if not meta:
        return 0
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for number, values, attrs in meta["trials"]:
        if number in running:
            study.tell(number, state=TrialState.FAIL)
        study.enqueue_trial(values, user_attrs=attrs)
    return len(meta["trials"])


def best_values(study: optuna.Study, depth: int) -> dict[str, Any]:
    """The best trial's searched values as fit settings (what the tuned map stores)."""
    trial = _best(study)
    return as_fit_settings({k: float(v) for k, v in trial.params.items()}, depth)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"no trial of study {study.study_name!r} has completed")
    return study.best_trial


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` below 3 pairs or when
    either side is constant."""
    if len(a) < 3:
        return None
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def study_report(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best and the baseline trial, and — for a holdout study with the
    clean image — how the holdout score agrees with the oracle PSNR of the same fits:
    Spearman's ρ across complete trials and the PSNR lost by the holdout's choice
    (best oracle PSNR among the trials minus that of the holdout-best trial)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    report: dict[str, Any] = {
        "study": study.study_name,
        "trials": len(trials),
        "complete": counts.get("complete", 0),
        "pruned": counts.get("pruned", 0),
        "failed": counts.get("fail", 0),
        "running": counts.get("running", 0) + counts.get("waiting", 0),
    }
    if not complete:
        return report
    best = study.best_trial
    report["best"] = {
        "trial": best.number,
        "value": best.value,
        **best.user_attrs,
        "params": best.params,
    }
    baseline = next((t for t in complete if t.user_attrs.get(BASELINE_ATTR)), None)
    if baseline is not None:
        report["baseline"] = {
            "trial": baseline.number,
            "value": baseline.value,
            **baseline.user_attrs,
            "params": baseline.params,
        }
    pairs = [
        (t.value, t.user_attrs["psnr_stop"])
        for t in complete
        if "holdout_psnr_stop" in t.user_attrs and t.user_attrs.get("psnr_stop") is not None
    ]
    if pairs:
        holdout, oracle = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True))
        report["agreement"] = {
            "spearman": spearman(holdout, oracle),
            "pairs": len(pairs),
            "oracle_psnr_of_holdout_choice": float(oracle[int(np.argmax(holdout))]),
            "best_oracle_psnr": float(oracle.max()),
            "psnr_lost_db": float(oracle.max() - oracle[int(np.argmax(holdout))]),
        }
    return report
