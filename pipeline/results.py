"""Writing and reading one fit's outputs: restored images, measured curves (CSV), summary (JSON).

Layout of a result folder::

    observation.png  clean.png (when known)
    restored_stop.png  restored_final.png  restored_best.png (when the clean image is known)
    curves.csv       one row per measured iteration
    summary.json     stop/peak/final scalars, the settings, and ``region``: where the image lies
                     in the network's output when it was padded to the network's size
                     (:class:`pipeline.problem.FitSize`; the images above are cut back to it)

The folder is written under a temporary name beside it and renamed when complete
(:func:`staged_folder`), so a failed or killed write leaves no result folder, and no file is ever
half-written. :func:`check_output_dir` refuses an unusable folder before a fit starts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from pipeline.errors import UserError, write_failure
from pipeline.imageio import WriteError, save_image, write_bytes_atomic
from pipeline.problem import Problem

if TYPE_CHECKING:
    from pipeline.fit import FitConfig

CURVES_FILE = "curves.csv"
SUMMARY_FILE = "summary.json"
RESULT_FILES = (
    "observation.png",
    "clean.png",
    "restored_stop.png",
    "restored_final.png",
    "restored_best.png",
    CURVES_FILE,
    SUMMARY_FILE,
)
"""Every file :func:`write_result` may write."""


@dataclass
class FitResult:
    """What one fit produced. Images are restored images (1,C,H,W) on the CPU in [0,1].

    ``at_stop`` is the output at ``stop_iteration`` of the rule named by ``stop_rule``: the ratio
    rule of the fit's settings, or ``"sure"`` (:func:`pipeline.stopping.sure_window_rule`) for a
    fit at λ chosen by :func:`pipeline.lambda_choice.choose_lambda` with that stop.
    """

    final: Tensor
    at_stop: Tensor
    best: Tensor | None
    stop_iteration: int | None
    best_iteration: int | None
    iterations_run: int
    curves: dict[str, np.ndarray]
    wall_time: float
    config: FitConfig
    stop_rule: str = "ratio"

    def summary(self) -> dict[str, Any]:
        """Scalars of the fit: stop, peak and final values of the curves."""

        def at(name: str, iteration: int | None) -> float | None:
            if iteration is None:
                return None
            index = int(np.searchsorted(self.curves["iteration"], iteration))
            value = float(self.curves[name][index])
            return None if np.isnan(value) else value

        last = int(self.curves["iteration"][-1])
        return {
            "iterations_run": self.iterations_run,
            "stop_rule": self.stop_rule,
            "stop_iteration": self.stop_iteration,
            "best_iteration": self.best_iteration,
            "psnr_final": at("psnr", last),
            "psnr_stop": at(
                "psnr", self.stop_iteration if self.stop_iteration is not None else last
            ),
            "psnr_best": at("psnr", self.best_iteration),
            "psnr_obs_final": at("psnr_obs", last),
            "wall_time_s": round(self.wall_time, 3),
        }


def summary_line(summary: dict[str, Any]) -> str:
    """A finished fit in one line, as the commands print it: iterations, time, the stopping
    rule's stop, and PSNR at the stop, the budget and the peak when a clean image was known."""
    stop, rule = summary["stop_iteration"], summary.get("stop_rule", "ratio")
    line = f"{summary['iterations_run']} iterations in {summary['wall_time_s']:.1f} s"
    line += f", {rule} rule stop at {stop}" if stop is not None else f", {rule} rule did not fire"
    if summary["psnr_final"] is not None:
        line += (
            f"; PSNR stop {summary['psnr_stop']:.2f} dB, final {summary['psnr_final']:.2f} dB, "
            f"peak {summary['psnr_best']:.2f} dB at {summary['best_iteration']}"
        )
    return line


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_curves(path: str | os.PathLike[str], curves: dict[str, np.ndarray]) -> None:
    """Atomically write the curves as CSV, ``iteration`` first; NaN (not measured) as empty."""
    names = ["iteration"] + [name for name in curves if name != "iteration"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    columns = [np.asarray(curves[name]) for name in names]
    for row in zip(*columns, strict=True):
        writer.writerow(
            [
                int(v) if i == 0 else ("" if np.isnan(v) else f"{float(v):.7g}")
                for i, v in enumerate(row)
            ]
        )
    write_bytes_atomic(Path(path), buffer.getvalue().encode())


def read_curves(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a curves CSV back into float arrays (``iteration`` as int).

    Raises:
        UserError: naming the file (and the line): it is missing or unreadable, not CSV text, has
            no ``iteration`` column or no row, a row of another length than the header, a value
            that is not a number, or an iteration that is not a whole number.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise UserError(f"curves file {path} is not readable: {err.strerror or err}") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"curves file {path} is not CSV text ({err})") from err
    if not rows or "iteration" not in rows[0]:
        raise UserError(f"curves file {path} has no header line with an iteration column")
    names, body = rows[0], rows[1:]
    if not body:
        raise UserError(f"curves file {path} has no measured iteration")
    values = np.empty((len(body), len(names)), dtype=np.float64)
    for line, row in enumerate(body, start=2):
        if len(row) != len(names):
            raise UserError(
                f"curves file {path} line {line} has {len(row)} values for {len(names)} columns"
            )
        try:
            values[line - 2] = [float(v) if v else np.nan for v in row]
        except ValueError as err:
            raise UserError(f"curves file {path} line {line}: {err}") from err
    curves = {name: values[:, i] for i, name in enumerate(names)}
    iterations = curves["iteration"]
    whole = np.isfinite(iterations) & (iterations == np.round(iterations)) & (iterations >= 0)
    if not whole.all():
        line = int(np.flatnonzero(~whole)[0]) + 2
        raise UserError(f"curves file {path} line {line}: the iteration is not a whole number")
    curves["iteration"] = iterations.astype(np.int64)
    return curves


def read_json(path: Path, needs: str, remedy: str) -> dict[str, Any]:
    """The JSON mapping in ``path``, which must map ``needs`` to a mapping; a missing, corrupt or
    incomplete file is a :class:`UserError` naming it and ``remedy``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err}); {remedy}") from err
    if not isinstance(data, dict) or not isinstance(data.get(needs), dict):
        raise UserError(f"{path} has no {needs}; {remedy}")
    return data


def read_summary(folder: Path) -> dict[str, Any]:
    """A fit's ``summary.json`` (:func:`read_json`)."""
    return read_json(folder / SUMMARY_FILE, "settings", "rerun the fit")


def check_output_dir(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work and naming it, an output folder that cannot be made or written: a
    file, a path through a file, or a place where nothing can be created (``/proc``, read-only
    or full disks, no permission). Creates nothing (a probe folder is made and removed)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is a file")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create output folder {path}: {existing} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".sdip-probe-", dir=existing)).rmdir()
    except OSError as err:
        raise UserError(
            f"cannot create output folder {path}: nothing can be written in {existing} "
            f"({write_failure(err)})"
        ) from err


@contextmanager
def staged_folder(out: Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A new temporary folder beside ``out`` to write into, which becomes ``out`` when the block
    ends without error: renamed, when ``out`` does not exist yet; else its files are moved into
    ``out`` one by one, each atomically, and the files named in ``replaces`` that this write did
    not make are removed from ``out`` (they belong to an earlier write). On an error the
    temporary folder is removed, with every parent folder made for it, and a
    :class:`WriteError` names the file in ``out``."""
    missing = [folder for folder in out.parents if not folder.exists()]
    staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
        yield staging
        if out.is_dir():
            for name in replaces:
                if not (staging / name).exists():
                    (out / name).unlink(missing_ok=True)
            for item in staging.iterdir():
                os.replace(item, out / item.name)
            staging.rmdir()
        else:
            staging.rename(out)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, WriteError) and err.path.parent == staging:
            raise WriteError(out / err.path.name, err.reason) from err
        if isinstance(err, OSError):
            raise WriteError(out, write_failure(err)) from err
        raise


def write_result(
    out_dir: str | os.PathLike[str],
    problem: Problem,
    result: FitResult,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a fit's images (cut to the user's image, :meth:`Problem.crop_output`), curves and
    summary to ``out_dir`` through :func:`staged_folder`; return the summary."""
    summary = {
        "task": problem.task.name,
        **result.summary(),
        "settings": result.config.flat(),
        "region": None if problem.region is None else list(problem.region),
        **(extra or {}),
    }
    images = {
        "observation.png": problem.observed_part(),
        "clean.png": problem.clean,
        "restored_stop.png": result.at_stop,
        "restored_final.png": result.final,
        "restored_best.png": result.best,
    }
    with staged_folder(Path(out_dir), RESULT_FILES) as folder:
        for name, image in images.items():
            if image is not None:
                shown = image if name == "observation.png" else problem.crop_output(image)
                save_image(folder / name, shown)
        write_curves(folder / CURVES_FILE, result.curves)
        write_json(folder / SUMMARY_FILE, summary)
    return summary
