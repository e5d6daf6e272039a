"""``sdip sweep KIND``: the λ or Gaussian-σ sweep of one prepared image (DVC ``sweep_*``).

Reads ``sweeps`` (task, variant, image, iterations, the swept values, ``batch``) and the fit
settings of the swept method (``lipschitz`` for λ, ``gaussian`` for σ) from params.yaml, fits the
image once per value and writes ``runs/sweeps/<kind>/<value>/`` (:mod:`pipeline.results`). The
members differ only in the swept setting, so ``batch`` of them at a time advance in one engine
pass (:func:`pipeline.fit.fit_many`). The invocation is an MLflow parent run with one child run
per value.
"""

from __future__ import annotations

import click

from pipeline.checkpoint import checkpoint_for
from pipeline.errors import UserError
from pipeline.fit import FitConfig, fit_many, resolve_device
from pipeline.layout import checkpoint_path, sweep_dir
from pipeline.observations import read_prepared
from pipeline.results import write_result
from pipeline.runtime import configure, handle_termination
from pipeline.settings import checkpoint_every, fit_settings, load_params, section
from pipeline.tracking import log_fits

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
    batch = sweeps.get("batch", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"params.yaml sweeps.batch must be an integer >= 1, got {batch!r}")
    named = sweeps.get("variant")
    problem, meta, variant = read_prepared(
        params, task, image, None if named is None else str(named)
    )
    base = fit_settings(params, task, method, image, variant, {"iterations": sweeps["iterations"]})
    shared = FitConfig.from_dict(base)
    configs = [
        FitConfig.from_dict({**base, **member_overrides(kind, value, shared.model.depth)})
        for value in values
    ]
    configure(shared.threads, shared.precision, resolve_device(shared.device))
    handle_termination()
    outs = [sweep_dir(kind, value) for value in values]
    results = []
    for start in range(0, len(configs), batch):
        group = configs[start : start + batch]
        observations, cleans = [problem.observation] * len(group), [problem.clean] * len(group)
        path = checkpoint_path(outs[start])
        checkpoint = checkpoint_for(path, group, observations, checkpoint_every(params))
        results += fit_many(observations, problem.task, group, cleans=cleans, checkpoint=checkpoint)
    extra = {"image": image, "method": method, "variant": variant, "observation": meta}
    summaries = [write_result(out, problem, r, extra) for out, r in zip(outs, results, strict=True)]
    if track:
        tags = {"profile": params.get("profile", "custom"), "dvc_stage": dvc_stage, "task": task}
        log_fits(task, f"sweep {kind} {task}/{variant}/{image}", {**tags, "image": image}, outs)
    for value, summary in zip(values, summaries, strict=True):
        click.echo(
            f"sweep {kind}={value}: stop {summary['stop_iteration']}, PSNR stop "
            f"{summary['psnr_stop']}, final {summary['psnr_final']}, best {summary['psnr_best']}"
        )
