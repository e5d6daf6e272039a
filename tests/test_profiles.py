"""Profiles: params.yaml is the default CPU profile, and `sdip profile` switches in one command."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from pipeline.settings import fit_settings, load_yaml
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_cpu_profile():
    assert load_yaml(ROOT / "params.yaml") == load_yaml(ROOT / "profiles" / "cpu.yaml")


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
