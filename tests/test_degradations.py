"""Tests of pipeline.degradations on small odd-sized grey and RGB images."""

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.degradations import (
    TASKS,
    Degradation,
    Denoising,
    Enhancement,
    Inpainting,
    JpegDeblocking,
    SuperResolution,
    lanczos2_kernel,
    make_degradation,
)
from pipeline.errors import UserError
from pipeline.imageio import center_crop_to_multiple, load_image, load_mask

H, W = 37, 53
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "inpainting"


def _smooth_image(channels: int, height: int = H, width: int = W, seed: int = 0) -> torch.Tensor:
    """A natural-ish test image in [0.15, 0.85]: low-frequency waves plus mild texture."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, height).view(-1, 1)
    cols = torch.linspace(0, 1, width).view(1, -1)
    planes = []
    for c in range(channels):
        wave = torch.sin(2 * math.pi * (1.5 + c) * rows) * torch.cos(2 * math.pi * 2.0 * cols)
        planes.append(0.5 + 0.25 * wave + 0.05 * torch.rand(height, width, generator=g))
    return torch.stack(planes).unsqueeze(0).clamp(0.15, 0.85)


@pytest.fixture(params=[1, 3], ids=["grey", "rgb"])
def image(request: pytest.FixtureRequest) -> torch.Tensor:
    return _smooth_image(request.param)


# --- denoising ---------------------------------------------------------------------------------


def test_denoising_shape_range_determinism(image: torch.Tensor) -> None:
    y = Denoising(sigma=25, seed=3).observe(image)
    assert y.shape == image.shape and y.dtype == image.dtype
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(Denoising(sigma=25, seed=3).observe(image), y, rtol=0, atol=0)
    assert not torch.equal(Denoising(sigma=25, seed=4).observe(image), y)


@pytest.mark.parametrize("sigma", [15.0, 25.0])
def test_denoising_noise_std(sigma: float) -> None:
    # At x = 0.5 clipping needs a 5σ draw, so the noise is (practically) unclipped.
    x = torch.full((1, 3, H, W), 0.5)
    noise = Denoising(sigma=sigma, seed=0).observe(x) - x
    assert noise.abs().max() < 0.5
    # 5,883 samples: the std estimate's standard error is ≈1 %, the mean's ≈σ/77.
    assert abs(noise.std().item() / (sigma / 255) - 1) < 0.05
    assert abs(noise.mean().item()) < 4 * (sigma / 255) / math.sqrt(noise.numel())


def test_denoising_draws_standard_normal_from_seeded_cpu_generator(image: torch.Tensor) -> None:
    g = torch.Generator(device="cpu").manual_seed(7)
    expected = (image + 25 / 255 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    torch.testing.assert_close(Denoising(sigma=25, seed=7).observe(image), expected, rtol=0, atol=0)
    y64 = Denoising(sigma=25, seed=7).observe(image.double())
    torch.testing.assert_close(y64.float(), expected, rtol=0, atol=1e-7)


def test_denoising_sigma_zero_and_errors(image: torch.Tensor) -> None:
    torch.testing.assert_close(Denoising(sigma=0).observe(image), image, rtol=0, atol=0)
    with pytest.raises(UserError, match="sigma"):
        Denoising(sigma=-1)
    with pytest.raises(UserError, match="sigma"):
        Denoising(sigma=float("nan"))


def test_denoising_loss_is_plain_mse(image: torch.Tensor) -> None:
    task = Denoising(seed=1)
    y = task.observe(image)
    out = _smooth_image(image.shape[1], seed=9)
    expected = ((out.double() - y.double()) ** 2).mean()
    assert task.loss_mask(y) is None
    assert abs(task.loss(out, y).item() - expected.item()) < 1e-7
    torch.testing.assert_close(task.restore(out, y), out, rtol=0, atol=0)
    assert task.output_shape(y) == (H, W)


# --- JPEG deblocking -----------------------------------------------------------------------------


def test_jpeg_changes_image_and_is_deterministic(image: torch.Tensor) -> None:
    y = JpegDeblocking(quality=10).observe(image)
    assert y.shape == image.shape
    assert y.min() >= 0 and y.max() <= 1
    # JPEG decodes to 8-bit values.
    torch.testing.assert_close(y * 255, (y * 255).round(), rtol=0, atol=1e-4)
    assert (y - image).abs().mean() > 5e-3
    torch.testing.assert_close(JpegDeblocking(quality=10).observe(image), y, rtol=0, atol=0)


def test_jpeg_matches_pillow_with_spec_settings(image: torch.Tensor) -> None:
    pixels = np.rint(image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=20, optimize=True, progressive=True)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.float32) / 255
    expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
    y = JpegDeblocking(quality=20).observe(image)
    np.testing.assert_array_equal(y[0].numpy(), expected)


def test_jpeg_error_falls_with_quality(image: torch.Tensor) -> None:
    errors = [
        ((JpegDeblocking(quality=q).observe(image) - image) ** 2).mean().item()
        for q in (10, 20, 30, 60, 95)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("quality", [0, 101, 10.5, True])
def test_jpeg_quality_errors(quality: object) -> None:
    with pytest.raises(UserError, match="quality"):
        JpegDeblocking(quality=quality)  # type: ignore[arg-type]


# --- inpainting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_inpainting_bernoulli_mask(image: torch.Tensor, p: float) -> None:
    task = Inpainting(p=p, seed=5)
    y = task.observe(image)
    m = task.mask
    assert m.shape == (1, 1, H, W)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    # 1,961 pixels: the kept fraction's standard error is ≤ 0.012.
    assert abs(m.mean().item() - p) < 0.04
    torch.testing.assert_close(y, image * m, rtol=0, atol=0)
    assert torch.all(y[:, :, m[0, 0] == 0] == 0)

    again = Inpainting(p=p, seed=5)
    torch.testing.assert_close(again.observe(image), y, rtol=0, atol=0)
    other = Inpainting(p=p, seed=6)
    other.observe(image)
    assert not torch.equal(other.mask, m)


def test_inpainting_loss_ignores_masked_pixels(image: torch.Tensor) -> None:
    task = Inpainting(p=0.5, seed=2)
    y = task.observe(image)
    m = task.mask
    out = _smooth_image(image.shape[1], seed=11)
    base = task.loss(out, y)
    changed_hidden = out + (1 - m) * torch.rand(
        out.shape, generator=torch.Generator().manual_seed(0)
    )
    assert task.loss(changed_hidden, y).item() == pytest.approx(base.item(), rel=0, abs=1e-9)
    changed_kept = out + m * 0.1
    assert task.loss(changed_kept, y).item() > base.item() + 1e-4
    expected = (((out - y) * m).double() ** 2).sum() / out.numel()
    assert abs(base.item() - expected.item()) < 1e-7


def test_inpainting_given_mask(image: torch.Tensor) -> None:
    mask = (torch.rand(H, W, generator=torch.Generator().manual_seed(1)) < 0.7).float()
    task = make_degradation("inpainting", mask=mask)
    y = task.observe(image)
    torch.testing.assert_close(y, image * mask, rtol=0, atol=0)
    assert isinstance(task, Inpainting) and torch.equal(task.mask[0, 0], mask)
    with pytest.raises(UserError, match=r"mask is 37×53 px but the image is 37×52"):
        task.observe(image[..., :-1])
    with pytest.raises(UserError, match="only 0 and 1"):
        Inpainting(mask=mask * 0.5)
    with pytest.raises(UserError, match="shape"):
        Inpainting(mask=torch.ones(2, H, W))
    for p in (0.0, 1.5):
        with pytest.raises(UserError, match="p must be"):
            Inpainting(p=p)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not available")
def test_inpainting_with_real_h5_mask() -> None:
    x_full = load_image(SHARED / "Dataset_Bernoulli" / "img" / "Cameraman256.png")
    m_full = load_mask(SHARED / "Dataset_Bernoulli" / "mask" / "Cameraman256.h5", 256, 256)
    x, m = center_crop_to_multiple(x_full), center_crop_to_multiple(m_full)
    task = Inpainting(mask=m)
    y = task.observe(x)
    assert y.shape == (1, 1, 256, 256)
    assert abs(task.mask.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(y, x * m, rtol=0, atol=0)


# --- super-resolution ----------------------------------------------------------------------------


def _numpy_lanczos2(factor: int, phase: float = 0.5) -> np.ndarray:
    """Literal transcription of the DIP kernel recipe with Python loops."""
    kernel_width = 4 * factor
    size = kernel_width - 1 if phase == 0.5 else kernel_width
    center = (kernel_width + 1) / 2
    kernel = np.zeros((size, size))
    for i in range(1, size + 1):
        for j in range(1, size + 1):
            value = 1.0
            for d in (abs(i + phase - center) / factor, abs(j + phase - center) / factor):
                if d != 0:
                    value *= 2 * np.sin(np.pi * d) * np.sin(np.pi * d / 2) / (np.pi**2 * d**2)
            kernel[i - 1, j - 1] = value
    return kernel / kernel.sum()


def _numpy_downsample(x: np.ndarray, kernel: np.ndarray, factor: int, pad: int) -> np.ndarray:
    """Replication padding then strided correlation, one channel, with explicit loops."""
    padded = np.pad(x, pad, mode="edge")
    rows = (padded.shape[0] - kernel.shape[0]) // factor + 1
    cols = (padded.shape[1] - kernel.shape[1]) // factor + 1
    out = np.empty((rows, cols))
    k = kernel.shape[0]
    for r in range(rows):
        for c in range(cols):
            out[r, c] = (
                padded[r * factor : r * factor + k, c * factor : c * factor + k] * kernel
            ).sum()
    return out


@pytest.mark.parametrize("phase", [0.5, 0])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_lanczos_kernel_matches_numpy(factor: int, phase: float) -> None:
    kernel = lanczos2_kernel(factor, phase)
    expected = _numpy_lanczos2(factor, phase)
    size = 4 * factor - (1 if phase == 0.5 else 0)
    assert kernel.shape == (size, size)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=0, atol=1e-15)
    assert abs(kernel.sum().item() - 1) < 1e-12
    torch.testing.assert_close(kernel, kernel.flip(0).flip(1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("phase", [0.5, 0])
@pytest.mark.parametrize("factor", [4, 8])
def test_sr_shapes(image: torch.Tensor, factor: int, phase: float) -> None:
    hr = _smooth_image(image.shape[1], 96, 64)
    task = SuperResolution(factor=factor, phase=phase)
    y = task.observe(hr)
    assert y.shape == (1, hr.shape[1], 96 // factor, 64 // factor)
    assert y.min() >= 0 and y.max() <= 1
    assert task.output_shape(y) == (96, 64)
    assert task.forward(hr).shape == y.shape
    torch.testing.assert_close(task.observe(hr), y, rtol=0, atol=0)
    assert task.loss(hr, y).ndim == 0


@pytest.mark.parametrize("phase", [0.5, 0])
@pytest.mark.parametrize("factor", [4, 8])
def test_sr_downsampler_keeps_constants(factor: int, phase: float) -> None:
    x = torch.full((1, 3, 96, 64), 0.37)
    d = SuperResolution(factor=factor, phase=phase).forward(x)
    torch.testing.assert_close(d, torch.full_like(d, 0.37), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("phase", "pad"), [(0.5, 7), (0, 6)])
def test_sr_downsampler_matches_numpy(phase: float, pad: int) -> None:
    factor = 4
    x = _smooth_image(3, 64, 32, seed=4)
    d = SuperResolution(factor=factor, phase=phase).forward(x)
    kernel = _numpy_lanczos2(factor, phase)
    for c in range(3):
        expected = _numpy_downsample(x[0, c].double().numpy(), kernel, factor, pad)
        np.testing.assert_allclose(d[0, c].numpy(), expected, rtol=0, atol=1e-6)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def test_sr_reference_downsampler_is_offset_from_observation() -> None:
    # Pillow centres LR pixel r on HR pixel 4r + 1.5, the phase-½ D on 4r: shifting the HR image
    # by 1 or 2 px (bracketing 1.5) must bring D(x) much closer to y than no shift.
    hr = _smooth_image(3, 192, 128)
    task = SuperResolution(factor=4)
    y = task.observe(hr)
    unshifted = _psnr(y, task.forward(hr))
    for s in (1, 2):
        shifted = F.pad(hr, (0, s, 0, s), mode="replicate")[..., s:, s:]
        assert _psnr(y, task.forward(shifted)) > unshifted + 5


@pytest.mark.parametrize("factor", [4, 8])
def test_sr_phase_zero_aligns_with_observation(factor: int) -> None:
    hr = _smooth_image(3, 192, 128)
    aligned = SuperResolution(factor=factor, phase=0)
    reference = SuperResolution(factor=factor)
    y = aligned.observe(hr)
    assert _psnr(y, aligned.forward(hr)) > 45
    assert _psnr(y, aligned.forward(hr)) > _psnr(y, reference.forward(hr)) + 15


def test_sr_errors() -> None:
    with pytest.raises(UserError, match="factor"):
        SuperResolution(factor=1)
    with pytest.raises(UserError, match="phase"):
        SuperResolution(factor=4, phase=0.25)
    with pytest.raises(UserError, match="even"):
        SuperResolution(factor=3, phase=0)
    with pytest.raises(UserError, match=r"37×53.*not divisible.*4"):
        SuperResolution(factor=4).observe(_smooth_image(1))


# --- enhancement ---------------------------------------------------------------------------------


def test_enhancement_reference_formula(image: torch.Tensor) -> None:
    task = Enhancement()
    y = task.observe(image)
    torch.testing.assert_close(y, image, rtol=0, atol=0)
    out = _smooth_image(image.shape[1], seed=7)
    torch.testing.assert_close(task.forward(out), out, rtol=0, atol=0)
    x, o = image.numpy().astype(np.float64), out.numpy().astype(np.float64)
    expected = np.clip(x + np.clip(x - o, 0, 1), 0, 1)
    np.testing.assert_allclose(task.restore(out, y).numpy(), expected, rtol=0, atol=1e-6)
    assert abs(task.loss(out, y).item() - ((x - o) ** 2).mean()) < 1e-7


def test_enhancement_gain_and_signed(image: torch.Tensor) -> None:
    out = _smooth_image(image.shape[1], seed=8)
    x, o = image.numpy().astype(np.float64), out.numpy().astype(np.float64)
    signed = Enhancement(gain=2.0, signed=True).restore(out, image).numpy()
    np.testing.assert_allclose(signed, np.clip(x + 2 * (x - o), 0, 1), rtol=0, atol=1e-6)
    clipped = Enhancement(gain=0.5).restore(out, image).numpy()
    np.testing.assert_allclose(clipped, np.clip(x + 0.5 * np.clip(x - o, 0, 1), 0, 1), atol=1e-6)
    with pytest.raises(UserError, match="signed"):
        Enhancement(signed="yes")  # type: ignore[arg-type]


# --- factory -------------------------------------------------------------------------------------


def test_make_degradation_builds_each_task(image: torch.Tensor) -> None:
    assert set(TASKS) == {"denoising", "deblocking", "inpainting", "sr", "enhancement"}
    for task, cls in TASKS.items():
        built = make_degradation(task)
        assert type(built) is cls and isinstance(built, Degradation) and built.name == task
    noisy = make_degradation("denoising", sigma=15, seed=2)
    assert isinstance(noisy, Denoising) and noisy.sigma == 15 and noisy.seed == 2


def test_make_degradation_errors() -> None:
    with pytest.raises(UserError, match=r"unknown task 'deraining'.*denoising.*enhancement"):
        make_degradation("deraining")
    with pytest.raises(UserError, match=r"unknown parameter\(s\) quality.*'denoising'.*sigma"):
        make_degradation("denoising", quality=10)
    with pytest.raises(UserError, match="sigma"):
        make_degradation("denoising", sigma=-5)
