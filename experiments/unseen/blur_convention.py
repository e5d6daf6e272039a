"""Item 4 of issue 10: how much the blur measure moved when its first differences became the
reference's zero-filled 'same' convolution with [1, −1] (which keeps the difference of rows and
columns 0 and 1) instead of ``np.diff`` then ``[1:-1]`` (which dropped it). On the 64×64 crops of
the CPU profile's protocol (resize 128, centre crop 64) of every bundled image used here; the old
form is transcribed below, the new one is the reference transcription of the tests.

    python experiments/unseen/blur_convention.py    # output: blur_convention.txt
"""

import numpy as np
from scipy.signal import convolve2d

from pipeline.datasets import bundled_folder
from pipeline.imageio import load_image
from pipeline.problem import shrink
from tests import numpy_reference as ref

FILES = [
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "camera.png",
    "moon.png",
    "grass.png",
    "microaneurysms.png",
    "gravel.png",
    "retina.jpg",
    "brick.png",
    "cell.png",
    "ihc.png",
    "hubble_deep_field.jpg",
    "coins.png",
    "clock_motion.png",
    "motorcycle_left.png",
    "page.png",
    "text.png",
]


def old_blur(img: np.ndarray) -> float:
    """The measure before the fix: np.diff, then [1:-1] on both axes."""
    g = ref.gray(img)
    box = np.ones(9) / 9
    vertical = convolve2d(g, box.reshape(9, 1), mode="same")
    horizontal = convolve2d(g, box.reshape(1, 9), mode="same")

    def trim(a: np.ndarray) -> np.ndarray:
        return a[5 : a.shape[0] - 4, 5 : a.shape[1] - 4]

    g, vertical, horizontal = trim(g), trim(vertical), trim(horizontal)
    values = []
    for axis, reblurred in ((0, vertical), (1, horizontal)):
        d_f = np.abs(np.diff(g, axis=axis))[1:-1, 1:-1]
        d_b = np.abs(np.diff(reblurred, axis=axis))[1:-1, 1:-1]
        d_v = np.maximum(d_f - d_b, 0)
        values.append((d_f.sum() - d_v.sum()) / d_f.sum())
    return max(values)


differences = []
for name in FILES:
    crop = shrink(load_image(bundled_folder() / name), 128, 64)[0].permute(1, 2, 0).numpy()
    crop = crop.astype(np.float64)
    crop = crop[..., 0] if crop.shape[2] == 1 else crop
    before, after = old_blur(crop), ref.blur(crop)
    differences.append(abs(before - after))
    print(f"{name:24s} before {before:.5f} after {after:.5f} change {after - before:+.2e}")
print(f"largest |change| {max(differences):.2e}, median {np.median(differences):.2e}")
