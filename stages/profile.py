"""``sdip profile NAME``: make params.yaml the profile ``profiles/NAME.yaml``.

DVC cannot choose the image lists of its matrix stages from a switch inside params.yaml, so a
profile is a whole params file; switching copies it (optionally pointing ``data.root`` at the
folder holding the paper's data sets) and ``dvc repro`` then reruns what changed.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.settings import PARAMS_FILE, PROFILES_DIR, load_yaml, write_params_atomic

HEADER = "# Made by `sdip profile {name}` from profiles/{name}.yaml; edit here or there.\n"


@click.command("profile")
@click.argument("name")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder holding the paper's data sets (sets data.root).",
)
def profile_command(name: str, data_root: Path | None) -> None:
    """Switch params.yaml to the profile NAME (cpu, paper, ...)."""
    source = Path(PROFILES_DIR) / f"{name}.yaml"
    if not source.is_file():
        known = ", ".join(sorted(p.stem for p in Path(PROFILES_DIR).glob("*.yaml")))
        raise UserError(f"unknown profile {name!r}; profiles: {known}")
    params = load_yaml(source)
    if data_root is not None:
        if not data_root.is_dir():
            raise UserError(f"data root {data_root} is not a folder")
        params["data"]["root"] = str(data_root.resolve())
    write_params_atomic(Path(PARAMS_FILE), params, HEADER.format(name=name))
    click.echo(f"params.yaml is now profile {name!r}; run `dvc repro`")
