"""``sdip``: one command-line entry point, one sub-command per DVC stage plus ``fit``."""

from __future__ import annotations

import sys

import click

from pipeline.errors import UserError


class UserErrorGroup(click.Group):
    """Turns a :class:`UserError` into one ``error:`` line and exit status 1, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="spectral-dip")
def cli() -> None:
    """spectral-dip: the deep image prior with measured and controlled spectral bias."""


def _register() -> None:
    from stages import aggregate, evaluate, fbc, fit, optimize, prepare, profile, tune

    for command in (
        fit.fit_command,
        profile.profile_command,
        prepare.prepare_command,
        optimize.optimize_command,
        tune.tune_command,
        fbc.fbc_command,
        evaluate.evaluate_command,
        aggregate.aggregate_command,
    ):
        cli.add_command(command)


_register()


def main() -> None:
    cli()
