"""Where to read PSNR when an image is padded to the network's size: on the user's image (the
region) or on the whole padded output? One fit per case, measured both ways.

An image whose sides are not multiples of 32 is mirrored into the smallest canvas the network can
output and the outputs are cut back (:class:`pipeline.problem.FitSize`). The clean image of a
simulated problem is padded the same way, so PSNR could be read on the whole canvas (the mirrored
border counts, border pixels up to three times) or on the region the user gets. The fit itself is
the same either way (PSNR steers nothing), so one fit gives both: the curves read PSNR on the
region, and a callback every iteration reads it on the whole canvas from the same output. For
each case this prints and writes the peak PSNR and its iteration under each reading, the PSNR
at the budget, and what choosing the peak by the whole canvas costs on the user's image.

Run from the repository root (writes ``bench/padded_psnr[-<method>].json``)::

    python -m bench.padded_psnr [--iterations 1500] [--width 32] [--method gaussian|dip]

``gaussian`` is the paper's full method (λ = 1.4, Gaussian upsampling), which plateaus;
``dip`` (no Lipschitz control, bilinear) peaks and decays, so its peak is chosen mid-run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from pipeline.fit import FitConfig, MemberView, fit
from pipeline.measures import psnr
from pipeline.problem import load_problem

METHODS = {
    "gaussian": {"lam": 1.4, "upsample": "gaussian"},
    "dip": {"lam": 0.0, "upsample": "bilinear"},
}
CASES = [
    # (task, image, rows, columns, degradation): sizes padded by 49 %, 35 % and 12 % of the canvas
    ("denoising", "astronaut", 45, 70, {"sigma": 25, "seed": 0}),
    ("denoising", "coffee", 100, 75, {"sigma": 25, "seed": 0}),
    ("denoising", "chelsea", 150, 200, {"sigma": 25, "seed": 0}),
    ("inpainting", "astronaut", 45, 70, {"p": 0.5, "seed": 0}),
]


def source(name: str, rows: int, columns: int) -> np.ndarray:
    """A ``rows × columns`` crop of a bundled image shrunk to about twice that size."""
    pixels = getattr(data, name)()
    step = max(1, min(pixels.shape[0] // (2 * rows), pixels.shape[1] // (2 * columns)))
    pixels = pixels[::step, ::step]
    top, left = (pixels.shape[0] - rows) // 2, (pixels.shape[1] - columns) // 2
    return pixels[top : top + rows, left : left + columns]


def run_case(case: tuple, config: FitConfig, folder: Path) -> dict:
    task, name, rows, columns, params = case
    path = folder / f"{name}-{rows}x{columns}.png"
    Image.fromarray(source(name, rows, columns)).save(path)
    problem = load_problem(task, path, params)
    assert problem.region is not None and problem.clean is not None
    whole: list[float] = []

    def on_whole_canvas(view: MemberView) -> None:
        # called every iteration (log_every = 1) with the output measured at iteration t − 1
        whole.append(float(psnr(view.last_out, problem.clean)[0]))

    result = fit(
        problem.observation,
        problem.task,
        config,
        [on_whole_canvas],
        problem.clean,
        region=problem.region,
    )
    region = result.curves["psnr"]
    whole_curve = np.asarray(whole)
    assert len(whole_curve) == len(region)
    at_region, at_whole = int(np.argmax(region)), int(np.argmax(whole_curve))
    canvas = problem.clean.shape[-2:]
    stop = result.stop_iteration
    return {
        "task": task,
        "image": f"{name} {rows}×{columns}",
        "canvas": f"{canvas[0]}×{canvas[1]}",
        "padded_fraction": round(1 - rows * columns / (canvas[0] * canvas[1]), 3),
        "peak_region_db": round(float(region[at_region]), 2),
        "peak_region_at": at_region,
        "peak_whole_db": round(float(whole_curve[at_whole]), 2),
        "peak_whole_at": at_whole,
        "final_region_db": round(float(region[-1]), 2),
        "final_whole_db": round(float(whole_curve[-1]), 2),
        "stop": stop,
        "stop_region_db": None if stop is None else round(float(region[stop]), 2),
        "stop_whole_db": None if stop is None else round(float(whole_curve[stop]), 2),
        "region_db_at_whole_peak": round(float(region[at_whole]), 2),
        "cost_of_whole_peak_db": round(float(region[at_region] - region[at_whole]), 3),
        "max_abs_difference_db": round(float(np.max(np.abs(region - whole_curve))), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--method", choices=sorted(METHODS), default="gaussian")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = FitConfig.from_dict(
        {
            "iterations": args.iterations,
            "width": args.width,
            "lr": args.lr,
            **METHODS[args.method],
            "ratio_window": 150,
            "ratio_eps": 0.1,
            "log_every": 1,
            "device": "cpu",
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_case(case, config, Path(folder)) for case in CASES]
    report = {
        "settings": {
            "iterations": args.iterations,
            "width": args.width,
            "lr": args.lr,
            "method": args.method,
            **METHODS[args.method],
        }
    }
    suffix = "" if args.method == "gaussian" else f"-{args.method}"
    out = Path(__file__).with_name(f"padded_psnr{suffix}.json")
    out.write_text(json.dumps({**report, "cases": rows}, indent=2, ensure_ascii=False) + "\n")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[key]) for key in keys))


if __name__ == "__main__":
    main()
