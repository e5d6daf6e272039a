"""Resumable fits: the whole state of a fit engine saved atomically, restored when the same fits
start again (``sdip optimize``, ``sdip sweep``, ``sdip tune``).

A checkpoint holds :meth:`pipeline.fit.FitState.state_dict` — network, Adam, RNG states, stopping
rules, backtracking, curves so far, ended members' results — with a fingerprint of what it is the
state of: every member's settings, observations and the library's code. It is written every
``every`` iterations and when the process is asked to terminate (SIGTERM, SIGINT:
:func:`pipeline.runtime.handle_termination`), to a temporary name then renamed, so a kill at any
moment leaves the previous checkpoint whole. A fit resumed from it continues bit for bit on the
CPU, and a time limit (SIGTERM, then SIGKILL) costs at most ``every`` iterations.

Checkpoints live outside the DVC outputs (``.checkpoints/``, see :mod:`pipeline.layout`), since
DVC empties a stage's outputs before running it, and are removed once the fits have ended. They
are pickles read with ``torch.load(weights_only=False)``: load only your own.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.errors import FitInterruptedError, UserError
from pipeline.imageio import write_bytes_atomic
from pipeline.runtime import termination_requested

if TYPE_CHECKING:
    from pipeline.fit import FitConfig, FitState

CODE = Path(__file__).resolve().parent


def code_digest() -> str:
    """sha256 of the library's source files: a checkpoint of other code is not resumed."""
    digest = hashlib.sha256()
    for path in sorted(CODE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(configs: Sequence[FitConfig], observations: Sequence[Tensor]) -> str:
    """What a checkpoint is the state of: the members' settings and observations, and the code."""
    values = {
        "configs": [config.flat() for config in configs],
        "observations": [
            hashlib.sha256(y.detach().float().cpu().numpy().tobytes()).hexdigest()
            for y in observations
        ],
        "code": code_digest(),
    }
    return json.dumps(values, sort_keys=True, default=str)


@dataclass
class Checkpoint:
    """The checkpoint file ``path`` of one set of fits, written every ``every`` iterations."""

    path: Path
    fingerprint: str
    every: int
    meta: dict[str, Any] | None = None
    """Saved with the state for the caller (:func:`saved_meta`): e.g. which trials a round ran."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise UserError(f"checkpoint interval must be an integer >= 1, got {self.every!r}")

    def restore(self, state: FitState) -> float:
        """Load the saved state into ``state`` when it is the state of these fits; returns the
        compute time the fits had used (0 when starting over). A checkpoint of other fits or
        other code is removed; an unreadable one is a :class:`UserError` naming it."""
        saved = _load(self.path)
        if saved is None:
            return 0.0
        if saved.get("fingerprint") != self.fingerprint:
            self.remove()
            return 0.0
        state.load_state_dict(saved["state"])
        return float(saved["elapsed"])

    def after_step(self, state: FitState, elapsed: float) -> None:
        """Save on schedule, or save and raise :class:`FitInterruptedError` when asked to stop."""
        signal_number = termination_requested()
        if signal_number is not None:
            self.save(state, elapsed)
            raise FitInterruptedError(signal_number, state.iteration, self.path)
        if state.iteration % self.every == 0:
            self.save(state, elapsed)

    def save(self, state: FitState, elapsed: float) -> None:
        buffer = io.BytesIO()
        saved = {
            "fingerprint": self.fingerprint,
            "elapsed": elapsed,
            "meta": self.meta,
            "state": state.state_dict(),
        }
        torch.save(saved, buffer)
        write_bytes_atomic(self.path, buffer.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def checkpoint_for(
    path: Path,
    configs: Sequence[FitConfig],
    observations: Sequence[Tensor],
    every: int,
    meta: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint of the fits of ``configs`` on ``observations`` at ``path``."""
    return Checkpoint(path, fingerprint(configs, observations), every, meta)


def saved_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta`` saved in the checkpoint at ``path``; None when there is none."""
    saved = _load(path)
    return None if saved is None else saved.get("meta")


def _load(path: Path) -> dict[str, Any] | None:
    """The saved checkpoint at ``path``, None when absent; unreadable is a :class:`UserError`."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(
            f"checkpoint {path} is unreadable ({err}); delete it to start the fit over"
        ) from err
    if not isinstance(saved, dict) or "state" not in saved:
        raise UserError(f"checkpoint {path} is not a checkpoint; delete it to start the fit over")
    return saved
