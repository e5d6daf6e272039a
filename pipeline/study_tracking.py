"""MLflow view of an Optuna study (``sdip tune``): one parent run shared by every worker and
resumption of the study, found by the study's unique id, and a child run per trial with its
settings, scores and curves (experiment ``tune-<task>``).

Every call goes through :func:`pipeline.tracking.guarded`: a failing store costs the study one
``warning:`` line and its MLflow view from there on, never a trial. A study's trials keep no run
folder, so ``sdip relog`` cannot log them again; their record is the study's outputs
(``trials.csv``, ``summary.json``) and its Optuna storage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking import client, experiment_id, git_commit, guarded, log_fit_run, repo_root
from pipeline.tuning import UID_ATTR, TrialOutcome

if TYPE_CHECKING:
    import optuna
    from mlflow.tracking import MlflowClient


class StudyTracker:
    """MLflow for one study: a parent run shared by every worker and resumption of the study
    (found by the study's unique id tag), a child run per trial with its curves and params.
    After the first failure of the store it logs nothing more."""

    def __init__(
        self,
        study: optuna.Study,
        experiment: str,
        tags: dict[str, Any],
        params: dict[str, Any],
        outputs: Path,
    ) -> None:
        self.tags = {
            "optuna_study": study.study_name,
            "optuna_study_uid": study.user_attrs[UID_ATTR],
            **tags,
        }
        self.relog = f"none: a study's trials keep no run folder; their record is {outputs}"
        self.failed = False

        def start() -> None:
            root = repo_root()
            self.mlflow: MlflowClient = client(root)
            self.experiment = experiment_id(self.mlflow, experiment, root)
            self.parent = self._parent(params)

        self._guarded("the study", start)

    def _guarded(self, what: str, log: Callable[[], object]) -> None:
        if not self.failed:
            self.failed = not guarded(f"{what} of {self.tags['optuna_study']}", self.relog, log)

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

        def log() -> None:
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

        self._guarded(f"trial {outcome.number}", log)

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

        def log() -> None:
            self.mlflow.log_batch(self.parent, metrics=metrics)
            self.mlflow.set_terminated(self.parent, status)

        self._guarded("the study's report", log)
