"""Tests of pipeline.imageio: loading, cropping, saving and masks on small odd-sized images."""

import errno
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.imageio import (
    center_crop_to_multiple,
    crop_box,
    load_image,
    load_mask,
    save_image,
    to_uint8,
)

H, W = 37, 53
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "inpainting"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def test_grey_8bit(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (H, W), dtype=np.uint8)
    x = load_image(_write(tmp_path / "g.png", a))
    assert x.shape == (1, 1, H, W) and x.dtype == torch.float32
    np.testing.assert_array_equal(x[0, 0].numpy(), a.astype(np.float32) / 255)


def test_rgb_and_rgba(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba = load_image(_write(tmp_path / "a.png", a))
    rgb = load_image(_write(tmp_path / "b.png", a[..., :3]))
    assert rgba.shape == rgb.shape == (1, 3, H, W)
    torch.testing.assert_close(rgba, rgb, rtol=0, atol=0)
    np.testing.assert_array_equal(rgb[0].permute(1, 2, 0).numpy(), a[..., :3] / np.float32(255))


def test_rgb_with_equal_channels_stays_rgb(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (H, W), dtype=np.uint8)
    x = load_image(_write(tmp_path / "e.png", np.stack([a, a, a], axis=-1)))
    assert x.shape == (1, 3, H, W)


def test_palette_and_bilevel(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert load_image(_write(tmp_path / "p.png", a, "P")).shape == (1, 3, H, W)
    bits = load_image(_write(tmp_path / "bits.png", a[..., 0], "1"))
    assert bits.shape == (1, 1, H, W)
    assert set(bits.unique().tolist()) <= {0.0, 1.0}


def test_16bit_normalised_by_65535(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    path = _write(tmp_path / "d.png", a)
    assert Image.open(path).mode == "I;16"
    x = load_image(path)
    assert x.shape == (1, 1, H, W)
    assert x[0, 0, 0, 0] == 0 and x[0, 0, 0, 1] == 1
    np.testing.assert_allclose(x[0, 0].numpy(), a / 65535.0, rtol=0, atol=1e-7)


def test_32bit_integer_and_float_files(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 65536, (H, W)).astype(np.int32)
    path = _write(tmp_path / "i.tif", a)
    assert Image.open(path).mode == "I"
    np.testing.assert_allclose(load_image(path)[0, 0].numpy(), a / 65535.0, rtol=0, atol=1e-7)
    with pytest.raises(UserError, match=r"outside 0\.\.65535"):
        load_image(_write(tmp_path / "big.tif", a + 70000))
    with pytest.raises(UserError, match="mode F"):
        load_image(_write(tmp_path / "f.tif", a.astype(np.float32) / 65535))


def test_channel_conversion(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey = load_image(_write(tmp_path / "c.png", a), channels=1)
    f = a.astype(np.float64) / 255
    expected = 0.2989 * f[..., 0] + 0.5870 * f[..., 1] + 0.1140 * f[..., 2]
    assert grey.shape == (1, 1, H, W)
    np.testing.assert_allclose(grey[0, 0].numpy(), expected, rtol=0, atol=1e-6)

    g = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgb = load_image(_write(tmp_path / "g.png", g), channels=3)
    assert rgb.shape == (1, 3, H, W)
    for c in range(3):
        np.testing.assert_array_equal(rgb[0, c].numpy(), g / np.float32(255))
    with pytest.raises(UserError, match="channels"):
        load_image(tmp_path / "g.png", channels=2)


def test_load_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(UserError, match=r"nope\.png"):
        load_image(missing)
    bogus = tmp_path / "bogus.png"
    bogus.write_text("not an image")
    with pytest.raises(UserError, match=r"not a readable image.*bogus\.png"):
        load_image(bogus)
    with pytest.raises(UserError, match="not a file"):
        load_image(tmp_path)
    # Any size loads; where it meets the network the size is checked (tests/test_bad_inputs.py).
    small = _write(tmp_path / "small.png", rng.integers(0, 256, (3, 5), dtype=np.uint8))
    assert load_image(small).shape == (1, 1, 3, 5)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_load_round_trip_exact(
    tmp_path: Path, rng: np.random.Generator, channels: int
) -> None:
    a = rng.integers(0, 256, (channels, H, W), dtype=np.uint8)
    x = torch.from_numpy(a).float().div(255).unsqueeze(0)
    out = tmp_path / "deep" / "er" / "x.png"
    save_image(out, x)
    assert Image.open(out).mode == ("L" if channels == 1 else "RGB")
    torch.testing.assert_close(load_image(out), x, rtol=0, atol=0)
    save_image(out, x[0])
    torch.testing.assert_close(load_image(out), x, rtol=0, atol=0)


def test_save_is_atomic_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    save_image(out, torch.zeros(1, 1, H, W))
    save_image(out, torch.ones(1, 1, H, W))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert load_image(out).min() == 1


def test_failed_save_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.imageio.os.replace", refuse)
    with pytest.raises(UserError, match=r"cannot write .*x\.png: No space left .*disk is full"):
        save_image(tmp_path / "x.png", torch.zeros(1, 1, H, W))
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        save_image(tmp_path / "x.png", torch.full((1, 1, H, W), float("nan")))
    with pytest.raises(UserError, match=r"\.png"):
        save_image(tmp_path / "x.jpg", torch.zeros(1, 1, H, W))
    assert list(tmp_path.iterdir()) == []


def test_to_uint8_rounds_and_clips() -> None:
    x = torch.tensor([-0.2, 0.0, 3.4 / 255, 3.6 / 255, 1.0, 1.7]).view(1, 1, 1, 6)
    np.testing.assert_array_equal(to_uint8(x), [[0, 0, 3, 4, 255, 255]])
    assert to_uint8(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(1, 2, 4, 5))


def test_crop_box_offsets() -> None:
    assert crop_box(37, 53, 32) == (2, 10, 32, 32)
    assert crop_box(100, 70, 32) == (2, 3, 96, 64)
    assert crop_box(64, 96, 32) == (0, 0, 64, 96)
    assert crop_box(101, 71, 8) == (2, 3, 96, 64)
    with pytest.raises(UserError, match="smaller than the crop multiple"):
        crop_box(31, 100, 32)


def test_center_crop_matches_box_and_aligns_mask() -> None:
    x = torch.arange(3 * 101 * 71, dtype=torch.float32).view(1, 3, 101, 71)
    m = torch.arange(101 * 71, dtype=torch.float32).view(1, 1, 101, 71)
    cx, cm = center_crop_to_multiple(x), center_crop_to_multiple(m)
    assert cx.shape == (1, 3, 96, 64) and cm.shape == (1, 1, 96, 64)
    # Top-left element of the crop sits at row (101-96)//2 = 2, column (71-64)//2 = 3.
    assert cx[0, 0, 0, 0] == 2 * 71 + 3 and cm[0, 0, 0, 0] == 2 * 71 + 3
    torch.testing.assert_close(cx[0, 1], x[0, 1, 2:98, 3:67])


def _write_h5(path: Path, data: np.ndarray, name: str = "mask") -> Path:
    with h5py.File(path, "w") as fh:
        fh.create_dataset(name, data=data)
    return path


@pytest.mark.parametrize("lead", [(1,), ()])
def test_load_mask_h5(tmp_path: Path, rng: np.random.Generator, lead: tuple[int, ...]) -> None:
    bits = rng.integers(0, 2, (H, W), dtype=np.int64)
    m = load_mask(_write_h5(tmp_path / "m.h5", bits.reshape(*lead, H, W)), H, W)
    assert m.shape == (1, 1, H, W) and m.dtype == torch.float32
    np.testing.assert_array_equal(m[0, 0].numpy(), bits)


def test_load_mask_image(tmp_path: Path, rng: np.random.Generator) -> None:
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    grey = _write(tmp_path / "m.png", (bits * 255).astype(np.uint8))
    np.testing.assert_array_equal(load_mask(grey, H, W)[0, 0].numpy(), bits)
    rgb = _write(tmp_path / "rgb.png", np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1))
    np.testing.assert_array_equal(load_mask(rgb, H, W)[0, 0].numpy(), bits)


def test_load_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"m\.h5 is 37×53 px but the image is 40×53"):
        load_mask(_write_h5(tmp_path / "m.h5", np.ones((1, H, W), np.int64)), 40, W)
    with pytest.raises(UserError, match="no dataset 'mask'"):
        load_mask(_write_h5(tmp_path / "other.h5", np.ones((H, W)), name="data"), H, W)
    with pytest.raises(UserError, match="only 0 and 1"):
        load_mask(_write_h5(tmp_path / "big.h5", np.full((H, W), 255)), H, W)
    with pytest.raises(UserError, match="not found"):
        load_mask(tmp_path / "missing.h5", H, W)
    with pytest.raises(UserError, match="not found"):
        load_mask(tmp_path / "missing.png", H, W)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"not a readable HDF5 file.*junk\.h5"):
        load_mask(tmp_path / "junk.h5", H, W)
    with pytest.raises(UserError, match=r"m2\.png is 37×53 px but the image is 37×52"):
        load_mask(_write(tmp_path / "m2.png", np.zeros((H, W), np.uint8)), H, W - 1)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not available")
def test_real_bernoulli_mask() -> None:
    image = load_image(SHARED / "Dataset_Bernoulli" / "img" / "Cameraman256.png")
    _, _, h, w = image.shape
    mask = load_mask(SHARED / "Dataset_Bernoulli" / "mask" / "Cameraman256.h5", h, w)
    assert image.shape == (1, 1, 256, 256) and mask.shape == (1, 1, 256, 256)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.5) < 0.01


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not available")
def test_real_region_mask_marks_kept_pixels_with_one() -> None:
    image = load_image(SHARED / "vase.png")
    _, _, h, w = image.shape
    mask = center_crop_to_multiple(load_mask(SHARED / "vase_mask.png", h, w))
    # The hole is a small block; almost all pixels are kept (measured 97.3 %).
    assert mask.shape == (1, 1, 320, 320)
    assert 0.9 < mask.mean().item() < 1.0
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, 180, 170] == 0
