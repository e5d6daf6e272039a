"""``sdip sweep KIND``: the λ or Gaussian-σ sweep of one prepared image (DVC ``sweep_*``).

Reads ``sweeps`` (task, variant, image, iterations, the swept values, ``batch``) and the fit
settings of the swept method (``lipschitz`` for λ, ``gaussian`` for σ) from params.yaml, fits the
image once per value and writes ``runs/sweeps/<kind>/<value>/`` (:mod:`pipeline.results`). The
members differ only in the swept setting, so ``batch`` of them at a time advance in one batched
network pass (:func:`pipeline.fit.fit_many`); ``batch: 1`` fits them one after the other.
The invocation is an MLflow parent run with one child run per value.
"""

from __future__ import annotations

import click

from pipeline.errors import UserError
from pipeline.fit import FitConfig, fit_many, resolve_device
from pipeline.layout import prepared_dir, sweep_dir
from pipeline.observations import read_observation
from pipeline.runtime import configure
from pipeline.settings import fit_settings, load_params, parse_variant, section, variant_name
from pipeline.tracking import stage_run
from stages.optimize import FitRecord

SWEPT_METHOD = {"lam": "lipschitz", "gauss_sigma": "gaussian"}
"""The method whose setting each sweep varies."""


def member_overrides(kind: str, value: float, depth: int) -> dict[str, object]:
    """The fit settings of one sweep member: σ is given to every upsampling block."""
    return {kind: [value] * depth if kind == "gauss_sigma" else value}


@click.command("sweep")
@click.argument("kind", type=click.Choice(sorted(SWEPT_METHOD)))
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--dvc-stage", default="", help="The DVC stage name, recorded as a tag.")
@click.option("--track/--no-track", default=True, show_default=True, help="Log to MLflow.")
def sweep_command(kind: str, params_file: str, dvc_stage: str, track: bool) -> None:
    """Fit the sweep image once per value of KIND (lam or gauss_sigma) in params.yaml."""
    params = load_params(params_file)
    sweeps = section(params, "sweeps")
    task, image, method = sweeps["task"], sweeps["image"], SWEPT_METHOD[kind]
    values = sweeps.get(kind) or []
    batch = int(sweeps.get("batch", 1))
    if batch < 1:
        raise UserError(f"params.yaml sweeps.batch must be >= 1, got {batch}")
    named = sweeps.get("variant")
    variant = variant_name(task, parse_variant(task, None if named is None else str(named)))
    problem, meta = read_observation(prepared_dir(task, variant, image))
    base = fit_settings(params, task, method, image, variant, {"iterations": sweeps["iterations"]})
    shared = FitConfig.from_dict(base)
    depth = shared.model.depth
    configs = [
        FitConfig.from_dict({**base, **member_overrides(kind, value, depth)}) for value in values
    ]
    configure(shared.threads, shared.precision, resolve_device(shared.device))
    results = []
    for start in range(0, len(configs), batch):
        group = configs[start : start + batch]
        results += fit_many(
            [problem.observation] * len(group),
            problem.task,
            group,
            cleans=[problem.clean] * len(group),
        )
    record = FitRecord(task, variant, image, method, meta, params.get("profile", "custom"))
    outs = [sweep_dir(kind, value) for value in values]
    summaries = [
        record.write(out, problem, result) for out, result in zip(outs, results, strict=True)
    ]
    if track:
        name = f"sweep {kind} {task}/{variant}/{image}"
        with stage_run(task, name, record.tags(dvc_stage)) as run:
            for value, out, config, result, summary in zip(
                values, outs, configs, results, summaries, strict=True
            ):
                record.log(run, out, config, result, summary, dvc_stage, f"{image}-{kind}={value}")
    for value, summary in zip(values, summaries, strict=True):
        click.echo(
            f"sweep {kind}={value}: stop {summary['stop_iteration']}, PSNR stop "
            f"{summary['psnr_stop']}, final {summary['psnr_final']}, best {summary['psnr_best']}"
        )
