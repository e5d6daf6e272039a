"""Fuzzing the two doors user data comes through: the image loader and the degradations.

Whatever file or parameters hypothesis draws (sizes down to 1 px, odd sizes, every Pillow mode,
several formats, bit depths, truncated or overwritten bytes; task parameters inside and outside
their ranges, NaN, infinities, bools for numbers, masks of the wrong size or values), the result
is either valid (a float32 tensor in [0, 1] of the right shape) or a :class:`UserError`, never
another exception. Examples are few and small so that the file runs in seconds.
"""

from __future__ import annotations

import io
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.degradations import TASKS, make_degradation
from pipeline.errors import UserError
from pipeline.imageio import load_image, load_mask

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GREY_MODES = {"1", "L", "LA", "I;16", "I"}
MODES = ["1", "L", "LA", "I;16", "I", "F", "RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"]
FORMATS = ["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]


def pillow_image(mode: str, height: int, width: int, seed: int) -> Image.Image:
    """A random ``height × width`` image of ``mode`` made by Pillow."""
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}.get(mode, 3)
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).tobytes()
    if mode in ("P", "PA"):
        return Image.frombytes("RGB", (width, height), data).convert(mode)
    return Image.frombytes(mode, (width, height), data)


def encoded(image: Image.Image, fmt: str) -> bytes | None:
    """``image`` written as ``fmt``; None where Pillow cannot write that mode in that format."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buffer.getvalue()


def corrupted(data: bytes, cut: float | None, flips: list[tuple[float, int]]) -> bytes:
    """``data`` truncated at fraction ``cut`` and with bytes overwritten at fractions ``flips``."""
    raw = bytearray(data if cut is None else data[: int(len(data) * cut)])
    for where, value in flips:
        if raw:
            raw[min(int(where * len(raw)), len(raw) - 1)] = value
    return bytes(raw)


def assert_valid_image(x: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[0] == 1 and x.shape[1] in (1, 3)
    if shape is not None:
        assert tuple(x.shape) == shape
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


@FUZZ
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(FORMATS),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    channels=st.sampled_from([None, 1, 3]),
    cut=st.none() | st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
)
def test_the_loader_gives_a_valid_image_or_a_user_error(
    mode, fmt, height, width, seed, channels, cut, flips
):
    data = encoded(pillow_image(mode, height, width, seed), fmt)
    assume(data is not None)
    intact = cut is None and not flips
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image.{fmt.lower()}"
        path.write_bytes(data if intact else corrupted(data, cut, flips))
        try:
            x = load_image(path, channels)
        except UserError:
            event("refused")
            assert not intact or mode == "F", f"an intact {mode} {fmt} file was refused"
            return
    event("read intact" if intact else "read corrupted")
    stored = Image.open(io.BytesIO(data)).mode  # the format may store another mode (GIF: P)
    grey = stored in GREY_MODES or (stored.startswith("I;16"))
    c = channels or (1 if grey else 3)
    assert_valid_image(x, (1, c, height, width) if intact else None)


@FUZZ
@given(
    height=st.integers(1, 30),
    width=st.integers(1, 30),
    values=st.sampled_from(["binary", "grey", "dark", "empty", "full"]),
    wrong_size=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mask_files_give_a_valid_mask_or_a_user_error(height, width, values, wrong_size, seed):
    rng = np.random.default_rng(seed)
    pixels = {
        "binary": rng.integers(0, 2, (height, width)) * 255,
        "grey": rng.integers(0, 256, (height, width)),
        "dark": rng.integers(0, 2, (height, width)),  # a 0/1 mask saved without scaling
        "empty": np.zeros((height, width)),
        "full": np.full((height, width), 255),
    }[values].astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mask.png"
        Image.fromarray(pixels).save(path)
        try:
            mask = load_mask(path, height + wrong_size, width)
        except UserError:
            # refused: the wrong size, or dark but not black (nothing would be kept)
            assert wrong_size or 0 < pixels.max() <= 127
            return
    assert not wrong_size
    assert mask.shape == (1, 1, height, width)
    np.testing.assert_array_equal(mask[0, 0].numpy(), (pixels > 127.5).astype(np.float32))


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-5, 120),
    st.booleans(),
    st.sampled_from(["10", None]),
)


@st.composite
def task_params(draw: st.DrawFn) -> tuple[str, dict]:
    """A task and parameters for it, inside and outside their ranges."""
    task = draw(st.sampled_from(sorted(TASKS)))
    params = {}
    for name in TASKS[task].parameters():
        if draw(st.booleans()):
            continue
        if name == "mask":
            shape = (draw(st.integers(1, 30)), draw(st.integers(1, 30)))
            fill = draw(st.sampled_from([0.0, 1.0, 0.5, "binary"]))
            generator = torch.Generator().manual_seed(draw(st.integers(0, 99)))
            binary = (torch.rand(shape, generator=generator) < 0.5).float()
            params[name] = binary if fill == "binary" else torch.full(shape, fill)
        elif name == "factor":
            params[name] = draw(st.integers(-1, 6) | st.booleans() | st.just(2.0))
        elif name == "phase":
            params[name] = draw(st.sampled_from([0, 0.5, 0.25, True, "0.5", math.nan]))
        else:
            params[name] = draw(NUMBERS)
    return task, params


@FUZZ
@given(
    case=task_params(),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 30),
    width=st.integers(1, 30),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    aligned=st.booleans(),
)
def test_degradations_give_valid_outputs_or_a_user_error(
    case, channels, height, width, dtype, seed, aligned
):
    task, params = case
    factor = params.get("factor", 4)
    if aligned and type(factor) is int and factor > 0:  # sizes SR can observe, often enough
        height, width = -(-height // factor) * factor, -(-width // factor) * factor
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((1, channels, height, width), generator=generator, dtype=dtype)
    try:
        degradation = make_degradation(task, **params)
        y = degradation.observe(x)
    except UserError:
        event(f"{task} refused")
        return
    event(f"{task} ran")
    assert y.dtype == dtype and y.shape[:2] == x.shape[:2]
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    out_h, out_w = degradation.output_shape(y)
    assert (out_h, out_w) == (height, width)  # every task's output is the clean image's size
    out = torch.rand((1, channels, out_h, out_w), generator=generator, dtype=dtype)
    assert degradation.forward(out).shape == y.shape
    loss = degradation.loss(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss >= 0
    restored = degradation.restore(out, y)
    assert restored.shape == out.shape and restored.min() >= 0 and restored.max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_header_that_claims_a_huge_image_is_a_user_error(tmp_path: Path, fmt: str):
    # a decompression bomb: Pillow refuses to decode more than twice its pixel limit
    data = encoded(pillow_image("L", 8, 8, 0), fmt)
    assert data is not None
    path = tmp_path / f"bomb.{fmt.lower()}"
    if fmt == "PNG":  # IHDR: length, type, then width and height at bytes 16..24, then its CRC
        header = b"IHDR" + (200_000).to_bytes(4, "big") * 2 + data[24:29]
        crc = zlib.crc32(header).to_bytes(4, "big")
        data = data[:12] + header + crc + data[33:]
    else:  # JPEG SOF0 height and width after the FFC0 marker
        at = data.index(b"\xff\xc0") + 5
        data = data[:at] + (65_000).to_bytes(2, "big") * 2 + data[at + 4 :]
    path.write_bytes(data)
    with pytest.raises(UserError, match="exceeds limit of 178956970 pixels"):
        load_image(path)
