"""Profiles: params.yaml is the default CPU profile, and `sdip profile` switches in one command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from dvc.utils.serialize import parse_yaml

from pipeline.errors import UserError
from pipeline.settings import fit_settings, load_yaml
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_cpu_profile():
    assert load_yaml(ROOT / "params.yaml") == load_yaml(ROOT / "profiles" / "cpu.yaml")


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_dvc_reads_each_profile_as_we_do(name: str):
    # DVC parses params.yaml with ruamel, which refuses what PyYAML would accept (a key twice).
    path = ROOT / "profiles" / f"{name}.yaml"
    assert parse_yaml(path.read_text(), str(path)) == load_yaml(path)


def test_profile_switch_rewrites_params(tmp_path: Path, monkeypatch):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    data = tmp_path / "datasets"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["profile", "paper", "--data-root", str(data)])
    assert result.exit_code == 0, result.output
    params = load_yaml(tmp_path / "params.yaml")
    assert params["profile"] == "paper" and params["data"]["root"] == str(data.resolve())
    assert fit_settings(params, "inpainting", "lipschitz")["lam"] == 1.6
    result = CliRunner().invoke(cli, ["profile", "gpu-cluster"])
    assert result.exit_code == 1 and "unknown profile 'gpu-cluster'" in result.output


def test_every_profile_names_the_same_stages_and_sections():
    cpu = load_yaml(ROOT / "profiles" / "cpu.yaml")
    for path in (ROOT / "profiles").glob("*.yaml"):
        other = load_yaml(path)
        assert set(other) == set(cpu), path.name
        assert set(other["tasks"]) == set(cpu["tasks"])
        assert set(other["methods"]) == set(cpu["methods"])


def test_per_image_settings_override_the_task_for_that_image_only():
    params = load_yaml(ROOT / "profiles" / "cpu.yaml")
    fit = params["tasks"]["denoising"]["fit"]
    fit["per_image"] = {"coffee": {"lam": 0.7, "lam_gaussian": 1.1, "iterations": 7}}
    coffee = fit_settings(params, "denoising", "lipschitz", "coffee")
    assert (coffee["lam"], coffee["iterations"]) == (0.7, 7)
    assert fit_settings(params, "denoising", "gaussian", "coffee")["lam"] == 1.1
    assert fit_settings(params, "denoising", "dip", "coffee")["lam"] == 0
    other = fit_settings(params, "denoising", "lipschitz", "astronaut")
    assert other["lam"] == fit["lam"] and "per_image" not in other


@pytest.mark.parametrize(
    ("per_image", "message"),
    [({"moon": {"lam": 1.0}}, "names moon, not in tasks.denoising.images"), ([1], "must map")],
)
def test_bad_per_image_settings_are_user_errors(per_image, message):
    params = load_yaml(ROOT / "profiles" / "cpu.yaml")
    params["tasks"]["denoising"]["fit"]["per_image"] = per_image
    with pytest.raises(UserError, match=message):
        fit_settings(params, "denoising", "lipschitz", "astronaut")
