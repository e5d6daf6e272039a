"""The exceptions the command line reports without a traceback: a user mistake (bad image, mask,
parameter or path) and a fit interrupted by a signal after saving its state.

The CLI turns them into one line and a non-zero exit; everything else is a bug and keeps its
traceback.
"""

from pathlib import Path


class UserError(Exception):
    """A mistake in what the user passed in; its message names the offending thing."""


class FitInterruptedError(Exception):
    """The process was asked to terminate; the fits' state is saved in :attr:`path`
    (:mod:`pipeline.checkpoint`)."""

    def __init__(self, signal_number: int, iteration: int, path: Path) -> None:
        super().__init__(
            f"interrupted at iteration {iteration}; its state is saved in {path}: run the same "
            "command again to resume"
        )
        self.signal_number = signal_number
        self.iteration = iteration
        self.path = path
