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


def _verify(path: Path, expected: str, label: str, image_set: str) -> SourceImage:
    if not path.is_file():
        raise UserError(f"image {label} not found at {path}")
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(
            f"image {label} at {path} differs from the manifest (sha256 {actual[:12]}…, "
            f"expected {expected[:12]}…)"
        )
    return SourceImage(Path(label).stem, path, actual, image_set)


def resolve_images(
    data: dict[str, Any],
    sets: str | list[str],
    names: list[str],
    manifest_path: str | os.PathLike[str] = MANIFEST,
) -> list[SourceImage]:
    """Locate and verify the images ``names`` of one task.

    ``data`` is params.yaml's ``data`` section: ``source`` (``bundled`` or ``folder``) and, for a
    folder, ``root``. ``sets`` are the task's folders in the manifest (e.g.
    ``[deblocking/classic5, deblocking/LIVE1]``), searched for each name; bundled images are
    looked up by name alone.
    """
    manifest = load_yaml(manifest_path)
    source = data.get("source", "bundled")
    if source == "bundled":
        entries = {e["name"]: e for e in manifest["bundled"]["files"]}
        folder = bundled_folder()
        found = []
        for name in names:
            if name not in entries:
                raise UserError(
                    f"image {name!r} is not a bundled image; bundled: {', '.join(sorted(entries))}"
                )
            entry = entries[name]
            found.append(_verify(folder / entry["file"], entry["sha256"], name, "bundled"))
        return found
    if source != "folder":
        raise UserError(f"params.yaml data.source must be 'bundled' or 'folder', got {source!r}")
    root = data.get("root")
    if not root:
        raise UserError("params.yaml data.root must name the folder of the paper's data sets")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UserError(f"data root {root_path} is not a folder")
    wanted = [sets] if isinstance(sets, str) else list(sets)
    entries: dict[str, tuple[str, dict[str, str]]] = {}
    for entry in manifest["paper"]["files"]:
        folder, _, file = entry["path"].rpartition("/")
        if folder in wanted:
            entries.setdefault(Path(file).stem, (folder, entry))
    found = []
    for name in names:
        if name not in entries:
            raise UserError(
                f"image {name!r} is not in the manifest's {', '.join(wanted)}; "
                f"known: {', '.join(sorted(entries))}"
            )
        folder, entry = entries[name]
        found.append(_verify(root_path / entry["path"], entry["sha256"], entry["path"], folder))
    return found
