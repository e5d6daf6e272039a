"""Shared fixtures: small odd-sized images and the real default profile, shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from pipeline.settings import load_yaml
from tests.services import mlflow_server, postgres, slurm  # noqa: F401  (session servers)

ROOT = Path(__file__).resolve().parents[1]

# The tests run dvc many times; its usage reports would each leave a file in /tmp.
os.environ["DVC_NO_ANALYTICS"] = "1"

# Tiny fits gain nothing from a second thread and slow down badly when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def astronaut_64() -> torch.Tensor:
    """A 64×64 RGB crop of a real image, as (1, 3, H, W) in [0, 1]."""
    pixels = data.astronaut()[::4, ::4][16:80, 40:104].astype(np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


@pytest.fixture
def cpu_profile() -> dict:
    """The real default profile (profiles/cpu.yaml)."""
    return load_yaml(ROOT / "profiles" / "cpu.yaml")
