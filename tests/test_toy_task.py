"""A new task is one class: a toy `Degradation` declared in this file alone runs through
``sdip fit`` and the prepare → optimize stages, with its variant, defaults and options found
from the class."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from skimage import data

from pipeline.degradations import TASKS, Degradation
from pipeline.errors import check_number
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = {"width": 8, "device": "cpu", "threads": 1, "log_every": 5}


@pytest.fixture
def darkening() -> Iterator[type[Degradation]]:
    """The toy task ``y = gain · x``, registered for the test and removed after it."""

    class Darkening(Degradation):
        """Darkening by a known gain: ``y = g·x``; the loss compares ``g·out`` with ``y``."""

        name = "darkening"
        variant = "gain"
        variant_list = "gains"
        defaults: ClassVar[dict[str, Any]] = {"lam": 1.2, "lam_gaussian": 1.7, "iterations": 9}
        options: ClassVar[dict[str, str]] = {"gain": "Brightness gain (default 0.5)."}

        def __init__(self, gain: float = 0.5) -> None:
            self.gain = check_number("gain", gain, 0)

        def observe(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

        def forward(self, out: torch.Tensor) -> torch.Tensor:
            return out * self.gain

    yield Darkening
    del TASKS["darkening"]


def invoke(*args: object) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_sdip_fit_runs_the_toy_task_with_its_option_and_defaults(darkening, tmp_path: Path):
    photo = tmp_path / "photo.png"
    Image.fromarray(data.camera()[::8, ::8][:33, :41]).save(photo)
    out = tmp_path / "out"
    invoke("fit", "darkening", photo, "--gain", 0.25, "-o", out, "--width", 8, "--device", "cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_params"]["gain"] == 0.25
    assert summary["settings"]["lam"] == 1.2  # the toy task's default, not FitConfig's 1.4
    assert summary["iterations_run"] == 9
    with Image.open(out / "restored_final.png") as restored:
        assert restored.size == (41, 33)


def test_prepare_then_optimize_run_the_toy_task(
    darkening, tmp_path: Path, cpu_profile: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "dataset", tmp_path / "dataset")  # where bundled images are checked
    # without the profile's own budget, the task's default (9 iterations) applies
    shared = {k: v for k, v in cpu_profile["fit"].items() if k != "iterations"}
    params = {
        **cpu_profile,
        "fit": {**shared, **TINY},
        "tasks": {"darkening": {"images": ["camera"], "observe": {"gains": [0.5, 0.8]}}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    invoke("prepare", "darkening")
    for gain in (0.5, 0.8):
        folder = tmp_path / f"data/prepared/darkening/gain{gain:g}/camera"
        clean = np.asarray(Image.open(folder / "clean.png"), dtype=np.float64) / 255
        observation = np.load(folder / "observation.npy")
        assert observation.shape == (1, 64, 64)
        np.testing.assert_allclose(observation[0], gain * clean, atol=0.5 / 255 * gain + 1e-6)
        assert json.loads((folder / "meta.json").read_text())["params"] == {"gain": gain}
    invoke("optimize", "darkening", "camera", "gaussian", "--variant", "0.8", "--no-track")
    summary = json.loads(
        (tmp_path / "runs/darkening/gain0.8/camera/gaussian/summary.json").read_text()
    )
    assert summary["settings"]["lam"] == 1.7  # lam_gaussian of the task, for methods.gaussian
    assert summary["settings"]["upsample"] == "gaussian"
    assert summary["iterations_run"] == 9
    assert summary["psnr_best"] is not None
