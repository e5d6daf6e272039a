"""Image sources: bundled images and the paper's sets are verified against the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.datasets import MANIFEST, resolve_images
from pipeline.errors import UserError
from pipeline.settings import load_yaml

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
    assert len(resolve_images(data, masks, paper["tasks"]["inpainting"]["images"], ROOT / MANIFEST))


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
