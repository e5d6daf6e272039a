"""``sdip``: one command-line entry point, one sub-command per DVC stage plus ``fit``."""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import FitInterruptedError, UserError

COMMANDS = {
    "fit": "stages.fit:fit_command",
    "profile": "stages.profile:profile_command",
    "prepare": "stages.prepare:prepare_command",
    "optimize": "stages.optimize:optimize_command",
    "sweep": "stages.sweep:sweep_command",
    "tune": "stages.tune:tune_command",
    "fbc": "stages.fbc:fbc_command",
    "evaluate": "stages.evaluate:evaluate_command",
    "aggregate": "stages.aggregate:aggregate_command",
    "relog": "stages.relog:relog_command",
}
"""Sub-command → where it lives. Imported on use: a DVC stage runs one command many times, and
importing every stage's dependencies (Optuna, matplotlib) each time would cost seconds."""


class SdipGroup(click.Group):
    """Loads sub-commands lazily and turns a :class:`UserError` into one ``error:`` line and exit
    status 1, and an interrupted fit (its state saved) into one line and 128 + the signal, as a
    shell reports a process the signal ended; neither with a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except FitInterruptedError as err:
            click.echo(str(err), err=True)
            sys.exit(128 + err.signal_number)


@click.group(cls=SdipGroup)
@click.version_option(package_name="spectral-dip")
def cli() -> None:
    """spectral-dip: the deep image prior with measured and controlled spectral bias."""


def main() -> None:
    cli()
