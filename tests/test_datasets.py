"""Image sources: bundled images and the paper's sets are verified against the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.datasets import MANIFEST, resolve_images
from pipeline.errors import UserError
from pipeline.observations import read_observation
from pipeline.settings import load_yaml
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="the paper's data sets are absent")


def test_bundled_images_of_the_default_profile_verify(cpu_profile):
    for task in cpu_profile["tasks"].values():
        found = resolve_images({"source": "bundled"}, "bundled", task["images"], ROOT / MANIFEST)
        assert [image.name for image in found] == task["images"]


def test_unknown_bundled_image_is_named():
    with pytest.raises(UserError, match="'nebula'"):
        resolve_images({"source": "bundled"}, "bundled", ["nebula"], ROOT / MANIFEST)


@needs_shared
def test_every_image_of_the_paper_profile_verifies():
    paper = load_yaml(ROOT / "profiles" / "paper.yaml")
    data = {"source": "folder", "root": str(SHARED)}
    for name, task in paper["tasks"].items():
        sets = task["observe"].get("set", name)
        found = resolve_images(data, sets, task["images"], ROOT / MANIFEST)
        assert len(found) == len(task["images"])
    masks = paper["tasks"]["inpainting"]["observe"]["masks"]
    images = paper["tasks"]["inpainting"]["images"]
    found = resolve_images(data, masks, images, ROOT / MANIFEST, suffixes=("_mask", ""))
    assert [mask.name for mask in found] == images
    files = {mask.name: mask.path.relative_to(SHARED).as_posix() for mask in found}
    assert files["vase"] == "inpainting/vase_mask.png"  # not vase.png, the image beside it
    assert files["boat"] == "inpainting/Dataset_Bernoulli/mask/boat.h5"


@needs_shared
def test_region_inpainting_of_the_paper_profile_prepares_colour_images_with_their_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    paper = load_yaml(ROOT / "profiles" / "paper.yaml")
    paper["data"]["root"] = str(SHARED)
    paper["tasks"]["inpainting"]["images"] = ["vase", "library"]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "dataset", tmp_path / "dataset")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(paper))
    result = CliRunner().invoke(cli, ["prepare", "inpainting"])
    assert result.exit_code == 0, result.output
    for name, kept in (("vase", 0.97), ("library", 0.81)):
        problem, meta = read_observation(tmp_path / "data/prepared/inpainting/default" / name)
        mask = problem.task.mask
        assert problem.clean is not None and problem.clean.shape[1] == 3
        assert meta["set"] == "inpainting"
        assert float(mask.mean()) == pytest.approx(kept, abs=0.01)
        torch.testing.assert_close(problem.observation, problem.clean * mask, rtol=0, atol=1e-6)


@needs_shared
def test_missing_and_altered_files_are_named(tmp_path: Path):
    root = tmp_path / "datasets"
    (root / "denoising").mkdir(parents=True)
    shutil.copy(SHARED / "denoising" / "kodim01.png", root / "denoising" / "kodim01.png")
    data = {"source": "folder", "root": str(root)}
    assert resolve_images(data, "denoising", ["kodim01"], ROOT / MANIFEST)[0].name == "kodim01"
    with pytest.raises(UserError, match=r"kodim02\.png not found"):
        resolve_images(data, "denoising", ["kodim02"], ROOT / MANIFEST)
    with open(root / "denoising" / "kodim01.png", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(UserError, match=r"kodim01\.png .* differs from the manifest"):
        resolve_images(data, "denoising", ["kodim01"], ROOT / MANIFEST)
