"""Where the pipeline's images come from, checked against ``dataset/manifest.yaml``.

Two sources:

- ``bundled``: images shipped inside scikit-image (``skimage/data``), so the default profile runs
  offline on a fresh machine;
- ``folder``: the paper's data sets under a root the user names (``data.root``), laid out as in
  the manifest (``denoising/kodim01.png``, ``deblocking/classic5/lena.bmp``, ...).

Every file's sha256 is compared with the manifest; a missing or altered file is a
:class:`~pipeline.errors.UserError` that names it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.settings import load_yaml

MANIFEST = Path("dataset") / "manifest.yaml"


@dataclass(frozen=True)
class SourceImage:
    """One verified source image: its short name, its file and the file's sha256."""

    name: str
    path: Path
    sha256: str
    set: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def _verify(path: Path, expected: str, label: str, image_set: str, name: str) -> SourceImage:
    if not path.is_file():
        raise UserError(f"image {label} not found at {path}")
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(
            f"image {label} at {path} differs from the manifest (sha256 {actual[:12]}…, "
            f"expected {expected[:12]}…)"
        )
    return SourceImage(name, path, actual, image_set)


def resolve_images(
    data: dict[str, Any],
    sets: str | list[str],
    names: list[str],
    manifest_path: str | os.PathLike[str] = MANIFEST,
    suffixes: tuple[str, ...] = ("",),
) -> list[SourceImage]:
    """Locate and verify the images ``names`` of one task.

    ``data`` is params.yaml's ``data`` section: ``source`` (``bundled`` or ``folder``) and, for a
    folder, ``root``. ``sets`` are the task's folders in the manifest (e.g.
    ``[deblocking/classic5, deblocking/LIVE1]``), searched for each name; bundled images are
    looked up by name alone. The file of name ``x`` is the first of ``x + suffix`` found for
    ``suffix`` in ``suffixes`` (masks: ``("_mask", "")``, so ``vase_mask.png`` is the mask of
    ``vase`` even beside ``vase.png``); the returned images carry the names asked for.
    """
    manifest = load_yaml(manifest_path)
    source = data.get("source", "bundled")
    # name → (file, sha256, label, set) of every image that may be asked for
    files: dict[str, tuple[Path, str, str, str]] = {}
    if source == "bundled":
        folder = bundled_folder()
        for entry in manifest["bundled"]["files"]:
            name = entry["name"]
            files[name] = (folder / entry["file"], entry["sha256"], name, "bundled")
        where = "the bundled images"
    elif source == "folder":
        root = data.get("root")
        if not root:
            raise UserError("params.yaml data.root must name the folder of the paper's data sets")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise UserError(f"data root {root_path} is not a folder")
        wanted = [sets] if isinstance(sets, str) else list(sets)
        for entry in manifest["paper"]["files"]:
            folder_name, _, file = entry["path"].rpartition("/")
            if folder_name in wanted:
                path = root_path / entry["path"]
                value = (path, entry["sha256"], entry["path"], folder_name)
                files.setdefault(Path(file).stem, value)
        where = f"the manifest's {', '.join(wanted)}"
    else:
        raise UserError(f"params.yaml data.source must be 'bundled' or 'folder', got {source!r}")
    found = []
    for name in names:
        key = _first_of(files, name, suffixes)
        if key is None:
            raise UserError(f"image {name!r} is not in {where}; known: {', '.join(sorted(files))}")
        found.append(_verify(*files[key], name))
    return found


def _first_of(entries: dict[str, Any], name: str, suffixes: tuple[str, ...]) -> str | None:
    return next((name + s for s in suffixes if name + s in entries), None)
