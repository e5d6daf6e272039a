"""pipeline.measures against the independent NumPy transcription in tests/numpy_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline import measures
from pipeline.errors import UserError
from tests import numpy_reference as ref

ATOL = 1e-6


def to_torch(img: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) NumPy image -> (1, C, H, W) float64 tensor."""
    if img.ndim == 2:
        img = img[..., None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def random_image(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.random((height, width, channels))
    return img[..., 0] if channels == 1 else img


def astronaut(height: int = 67, width: int = 45) -> np.ndarray:
    return skimage.data.astronaut()[100 : 100 + height, 200 : 200 + width].astype(np.float64) / 255


def camera(height: int = 61, width: int = 53) -> np.ndarray:
    return skimage.data.camera()[150 : 150 + height, 220 : 220 + width].astype(np.float64) / 255


def noisy(img: np.ndarray, seed: int, sigma: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + sigma * rng.standard_normal(img.shape), 0.0, 1.0)


IMAGES = {
    "random-rgb-37x45": lambda: random_image(0, 37, 45),
    "random-gray-45x37": lambda: random_image(1, 45, 37, channels=1),
    "random-rgb-32x48": lambda: random_image(2, 32, 48),
    "astronaut-67x45": astronaut,
    "camera-61x53": camera,
    "astronaut-101x131": lambda: astronaut(101, 131),
}


@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> np.ndarray:
    return IMAGES[request.param]()


def test_grayscale_weights_clip_and_identity() -> None:
    x = torch.tensor([[0.5, 1.0], [0.25, 1.0], [1.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 2)
    g = measures.grayscale(x)
    assert g.shape == (1, 1, 1, 2)
    assert g[0, 0, 0, 0].item() == pytest.approx(0.2989 * 0.5 + 0.5870 * 0.25 + 0.1140)
    assert g[0, 0, 0, 1].item() == pytest.approx(0.9999)
    assert measures.grayscale(2 * x).max().item() == 1.0
    one = torch.rand(2, 1, 5, 7, dtype=torch.float64)
    assert measures.grayscale(one) is one


def test_fbc_matches_reference(image: np.ndarray) -> None:
    output = noisy(image, seed=3, sigma=0.2)
    reference = noisy(image, seed=4)
    got = measures.fbc(to_torch(output), to_torch(reference))
    assert got.shape == (1, 5)
    np.testing.assert_allclose(got[0].numpy(), ref.fbc(output, reference), rtol=0, atol=ATOL)


@pytest.mark.parametrize(("height", "width", "bands"), [(33, 64, 3), (50, 21, 7), (9, 4, 5)])
def test_fbc_shapes_and_band_counts(height: int, width: int, bands: int) -> None:
    output, reference = random_image(5, height, width), random_image(6, height, width)
    got = measures.fbc(to_torch(output), to_torch(reference), bands=bands)[0].numpy()
    expected = ref.fbc(output, reference, bands=bands)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL, equal_nan=True)


def test_fbc_empty_band_is_nan() -> None:
    # W = 4: radii 0.4, 0.8, ... so no frequency lies in (0.4, 0.8].
    x = to_torch(random_image(7, 9, 4))
    got = measures.fbc(x, x.flip(-1))[0]
    assert torch.isnan(got[1])
    assert not torch.isnan(got[0])


def test_fbc_identical_is_one_in_every_band() -> None:
    x = to_torch(astronaut())
    torch.testing.assert_close(
        measures.fbc(x, x), torch.ones(1, 5, dtype=x.dtype), atol=ATOL, rtol=0
    )
    x32 = x.float()
    torch.testing.assert_close(measures.fbc(x32, x32), torch.ones(1, 5), atol=ATOL, rtol=0)


def test_fbc_low_bands_match_better_for_smooth_output() -> None:
    """A Gaussian-blurred copy keeps the low frequencies of its source and loses the high ones;
    a stronger blur matches less in every band."""
    clean = to_torch(astronaut(101, 131))
    mild, strong = (
        measures.fbc(to_torch(gaussian_filter(astronaut(101, 131), sigma=(s, s, 0))), clean)[0]
        for s in (1.0, 2.0)
    )
    assert mild[0] > 0.85
    assert torch.all(mild[:-1] > mild[1:])
    assert torch.all(strong < mild)


def test_fbc_batch_equals_single_calls_and_broadcasts_reference() -> None:
    outputs = torch.cat([to_torch(noisy(astronaut(), seed=s)) for s in range(3)])
    reference = to_torch(astronaut())
    batched = measures.fbc(outputs, reference)
    singles = torch.cat([measures.fbc(outputs[i : i + 1], reference) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        measures.fbc(outputs, reference.expand(3, -1, -1, -1)), batched, atol=1e-12, rtol=0
    )
    assert not torch.allclose(batched[0], batched[1], atol=1e-6, rtol=0)


def test_blur_matches_reference(image: np.ndarray) -> None:
    got = measures.blur(to_torch(image))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(ref.blur(image), abs=ATOL)


FIRST_DIFFERENCE_IMAGE = np.array(
    [
        [1, 2, 4, 7, 1],
        [3, 3, 0, 2, 5],
        [0, 6, 1, 1, 2],
        [4, 4, 9, 3, 0],
        [2, 8, 5, 6, 7],
    ],
    dtype=np.float64,
)
"""A 5×5 case for the blur's first differences, worked out by hand below."""


def test_first_difference_hand_computed_5x5() -> None:
    """|a[i] − a[i−1]| at kept rows and columns 1..3 (the 'same' convolution's index 0 holds a[0]
    and is trimmed away): the difference of rows (columns) 0 and 1 is the first kept one."""
    vertical = np.array([[1, 4, 5], [3, 1, 1], [2, 8, 2]], dtype=np.float64)
    horizontal = np.array([[0, 3, 2], [6, 5, 0], [0, 5, 6]], dtype=np.float64)
    image = torch.from_numpy(FIRST_DIFFERENCE_IMAGE)[None]
    for axis, expected in ((0, vertical), (1, horizontal)):
        np.testing.assert_array_equal(ref.first_difference(FIRST_DIFFERENCE_IMAGE, axis), expected)
        got = measures.first_difference(image, axis + 1)
        np.testing.assert_array_equal(got[0].numpy(), expected)


def test_blur_smallest_image_matches_reference() -> None:
    image = random_image(5, measures.BLUR_MIN_SIZE, measures.BLUR_MIN_SIZE + 3)
    assert measures.blur(to_torch(image)).item() == pytest.approx(ref.blur(image), abs=ATOL)


def test_sharpness_matches_reference(image: np.ndarray) -> None:
    got = measures.sharpness(to_torch(image))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(ref.sharpness(image), abs=ATOL)


def test_ratio_matches_reference(image: np.ndarray) -> None:
    got = measures.blur_sharpness_ratio(to_torch(image)).item()
    assert got == pytest.approx(ref.blur(image) / ref.sharpness(image), rel=1e-6)


@pytest.mark.parametrize(("height", "width"), [(4, 5), (13, 17), (20, 40), (34, 35)])
def test_sharpness_small_images_use_available_ranks(height: int, width: int) -> None:
    # (H-3)(W-3) kept pixels: 2 (ranks 2..1 -> raises), 140, 629 and 992, all below 1001.
    image = random_image(8, height, width)
    if (height - 3) * (width - 3) < 3:
        with pytest.raises(UserError, match="too small"):
            measures.sharpness(to_torch(image))
        return
    got = measures.sharpness(to_torch(image)).item()
    assert got == pytest.approx(ref.sharpness(image), abs=ATOL)


def test_sharpness_hand_computed_ranks_and_weights() -> None:
    """Three isolated bright pixels: each gives its 8 neighbours the variation a (rank order
    a1 x 8, a2 x 8, a3 x 8, then zeros); S^2 is the mean over the 999 ranks 2..1000."""
    image = np.zeros((40, 40))
    amplitudes = (0.9, 0.5, 0.3)
    for (row, col), a in zip([(10, 10), (20, 25), (30, 12)], amplitudes, strict=True):
        image[row, col] = a
    ranks = np.arange(2, 1001)
    values = np.zeros(ranks.size)
    for i, a in enumerate(amplitudes):
        values[(ranks >= 8 * i) & (ranks < 8 * (i + 1))] = a
    expected = np.sqrt(np.sum((values * np.exp(-0.01 * ranks)) ** 2) / 999)
    assert measures.sharpness(to_torch(image)).item() == pytest.approx(expected, abs=1e-12)


def test_sharpness_border_quirk_ignores_pixels_outside_kept_block() -> None:
    """Bright rows/columns 0, 1 and N-1 sit outside the kept block 2..N-2 and read as 0, so a
    block of zeros has zero sharpness (true neighbours would give variation 1 on its border)."""
    image = np.zeros((30, 30))
    image[:2, :] = image[:, :2] = image[-1, :] = image[:, -1] = 1.0
    assert measures.sharpness(to_torch(image)).item() == 0.0
    assert ref.sharpness(image) == 0.0
    image[2, 5] = 1.0
    assert measures.sharpness(to_torch(image)).item() > 0.0


def test_blur_rises_and_sharpness_falls_under_gaussian_blur() -> None:
    image = astronaut(101, 131)
    previous_blur, previous_sharpness = -np.inf, np.inf
    for sigma in (0.0, 1.0, 2.0):
        x = to_torch(gaussian_filter(image, sigma=(sigma, sigma, 0)))
        b, s = measures.blur(x).item(), measures.sharpness(x).item()
        assert b > previous_blur
        assert s < previous_sharpness
        previous_blur, previous_sharpness = b, s


def test_blur_sharpness_batch_equals_single_calls() -> None:
    images = torch.cat([to_torch(gaussian_filter(astronaut(), sigma=(s, s, 0))) for s in (0, 1, 3)])
    for fn in (measures.blur, measures.sharpness, measures.blur_sharpness_ratio):
        batched = fn(images)
        assert batched.shape == (3,)
        singles = torch.cat([fn(images[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, singles, atol=1e-12, rtol=0)
        assert len(set(batched.tolist())) == 3


def test_float32_default_path_is_close_to_float64() -> None:
    image = astronaut(101, 131)
    other = noisy(image, seed=9)
    x64, y64 = to_torch(image), to_torch(other)
    x32, y32 = x64.float(), y64.float()
    for fn in (measures.blur, measures.sharpness, measures.blur_sharpness_ratio):
        assert fn(x32).dtype == torch.float32
        torch.testing.assert_close(fn(x32).double(), fn(x64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        measures.fbc(x32, y32).double(), measures.fbc(x64, y64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        measures.ssim(x32, y32).double(), measures.ssim(x64, y64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        measures.psnr(x32, y32).double(), measures.psnr(x64, y64), atol=1e-4, rtol=0
    )


def test_psnr_matches_skimage_and_identical_is_inf() -> None:
    clean = astronaut()
    estimate = noisy(clean, seed=10)
    got = measures.psnr(to_torch(estimate), to_torch(clean)).item()
    assert got == pytest.approx(peak_signal_noise_ratio(clean, estimate, data_range=1.0), abs=1e-9)
    assert got == pytest.approx(ref.psnr(estimate, clean), abs=1e-9)
    assert measures.psnr(to_torch(clean), to_torch(clean)).item() == float("inf")
    scaled = measures.psnr(to_torch(255 * estimate), to_torch(255 * clean), data_range=255.0)
    assert scaled.item() == pytest.approx(got, abs=1e-9)


@pytest.mark.parametrize("name", ["astronaut-67x45", "camera-61x53", "random-rgb-37x45"])
def test_ssim_matches_skimage(name: str) -> None:
    clean = IMAGES[name]()
    estimate = noisy(clean, seed=11)
    channel_axis = -1 if clean.ndim == 3 else None
    expected = structural_similarity(
        estimate,
        clean,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=channel_axis,
    )
    got = measures.ssim(to_torch(estimate), to_torch(clean)).item()
    assert got == pytest.approx(expected, abs=1e-10)
    assert measures.ssim(to_torch(clean), to_torch(clean)).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_and_psnr_batch_equals_single_calls() -> None:
    clean = to_torch(astronaut())
    estimates = torch.cat(
        [to_torch(noisy(astronaut(), seed=s, sigma=0.05 * (s + 1))) for s in range(3)]
    )
    for fn in (measures.ssim, measures.psnr, measures.psnr_y):
        batched = fn(estimates, clean)
        singles = torch.cat([fn(estimates[i : i + 1], clean) for i in range(3)])
        torch.testing.assert_close(batched, singles, atol=1e-12, rtol=0)
        assert batched[0] > batched[1] > batched[2]


def test_rgb_to_y_and_psnr_y_match_reference() -> None:
    clean = astronaut()
    estimate = noisy(clean, seed=12)
    y = measures.rgb_to_y(to_torch(clean))
    assert y.shape == (1, 1, 67, 45)
    np.testing.assert_allclose(y[0, 0].numpy(), ref.y_channel(clean), rtol=0, atol=1e-12)
    assert measures.rgb_to_y(torch.ones(1, 3, 2, 2)).max().item() == pytest.approx(235 / 255)
    assert measures.rgb_to_y(torch.zeros(1, 3, 2, 2)).max().item() == pytest.approx(16 / 255)
    for shave in (0, 4, 7):
        got = measures.psnr_y(to_torch(estimate), to_torch(clean), shave=shave).item()
        assert got == pytest.approx(ref.psnr_y(estimate, clean, shave=shave), abs=1e-9)
    gray = camera()
    gray_estimate = noisy(gray, seed=13)
    got = measures.psnr_y(to_torch(gray_estimate), to_torch(gray)).item()
    assert got == pytest.approx(ref.psnr_y(gray_estimate, gray), abs=1e-9)


def test_measures_run_without_host_synchronisation() -> None:
    """Meta tensors hold no data: any .item(), host copy or branch on a value would raise."""
    x = torch.empty(2, 3, 37, 45, device="meta")
    y = torch.empty(2, 3, 37, 45, device="meta")
    assert measures.fbc(x, y).shape == (2, 5)
    for fn in (measures.blur, measures.sharpness, measures.blur_sharpness_ratio):
        assert fn(x).shape == (2,)
    for fn in (measures.psnr, measures.ssim, measures.psnr_y):
        assert fn(x, y).shape == (2,)
    with pytest.raises(RuntimeError):
        x.sum().item()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: measures.blur(torch.rand(3, 20, 20)), "shape"),
        (lambda: measures.blur(torch.rand(1, 2, 20, 20)), "channels"),
        (lambda: measures.blur(torch.zeros(1, 3, 20, 20, dtype=torch.int64)), "floating"),
        (lambda: measures.blur(np.zeros((1, 3, 20, 20))), "torch.Tensor"),
        (lambda: measures.blur(torch.rand(1, 3, 11, 40)), "too small"),
        (lambda: measures.psnr(torch.rand(2, 3, 9, 9), torch.rand(3, 3, 9, 9)), "does not match"),
        (lambda: measures.psnr(torch.rand(1, 3, 9, 9), torch.rand(1, 1, 9, 9)), "does not match"),
        (lambda: measures.psnr(torch.rand(1, 3, 9, 9), torch.rand(1, 3, 9, 9), 0.0), "data_range"),
        (
            lambda: measures.ssim(torch.rand(1, 3, 11, 11), torch.rand(1, 3, 11, 11).double()),
            "dtype",
        ),
        (lambda: measures.fbc(torch.rand(1, 3, 9, 9), torch.rand(1, 3, 9, 9), bands=0), "bands"),
        (lambda: measures.ssim(torch.rand(1, 3, 10, 30), torch.rand(1, 3, 10, 30)), "too small"),
        (lambda: measures.psnr_y(torch.rand(1, 3, 8, 9), torch.rand(1, 3, 8, 9)), "shave"),
        (lambda: measures.psnr_y(torch.rand(1, 3, 9, 9), torch.rand(1, 3, 9, 9), -1), "shave"),
    ],
)
def test_user_errors(call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call()
