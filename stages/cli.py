"""``sdip``: one command-line entry point, one sub-command per DVC stage plus ``fit``."""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import FitInterruptedError, UserError, write_failure

COMMANDS = {
    "fit": "stages.fit:fit_command",
    "profile": "stages.profile:profile_command",
    "prepare": "stages.prepare:prepare_command",
    "optimize": "stages.optimize:optimize_command",
    "sweep": "stages.sweep:sweep_command",
    "tune": "stages.tune:tune_command",
    "launch": "stages.launch:launch_command",
    "fbc": "stages.fbc:fbc_command",
    "evaluate": "stages.evaluate:evaluate_command",
    "aggregate": "stages.aggregate:aggregate_command",
    "relog": "stages.relog:relog_command",
}
"""Sub-command → where it lives. Imported on use: a DVC stage runs one command many times, and
importing every stage's dependencies (Optuna, matplotlib) each time would cost seconds."""


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: Python's, PyTorch's on a GPU, or its CPU
    allocator's (a RuntimeError that says so)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


class SdipGroup(click.Group):
    """Loads sub-commands lazily and turns a :class:`UserError` into one ``error:`` line and exit
    status 1, and an interrupted fit (its state saved) into one line and 128 + the signal, as a
    shell reports a process the signal ended; neither with a traceback. Running out of memory (a
    huge ``--width``, image or budget) and an ``OSError`` of the file system are one ``error:``
    line too."""

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
        except OSError as err:
            # a file system refusal the command did not foresee (a folder in /proc, a full disk)
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"error: {where}{write_failure(err)}", err=True)
            sys.exit(1)
        except (MemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            click.echo(
                f"error: out of memory ({first}); use a smaller image, --width or budget",
                err=True,
            )
            sys.exit(1)


@click.group(cls=SdipGroup)
@click.version_option(package_name="spectral-dip")
def cli() -> None:
    """spectral-dip: the deep image prior with measured and controlled spectral bias."""


def main() -> None:
    cli()
