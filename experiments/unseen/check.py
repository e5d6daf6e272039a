"""The CPU profile's phenomena check on the held-out group (issue 10, item 3), as one command:

    python experiments/unseen/check.py [--params params.yaml] [--images moon,grass,...]
        [--stop sure|ratio]

runs :func:`pipeline.unseen.check_unseen` (λ by MC-SURE per image at the SURE window rule's stop
or the profile's ratio rule's, every fit to its budget),
prints one line per image and the verdicts, and writes ``check.json`` next to this file. The
default group is the validation set of this experiment (README).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.lambda_choice import STOPS
from pipeline.settings import load_params
from pipeline.unseen import check_unseen

HERE = Path(__file__).parent
GROUP = (
    "moon,grass,microaneurysms,gravel,retina,brick,cell,ihc,hubble_deep_field,coins,"
    "clock_motion,motorcycle_left,page,text"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", default=GROUP)
    parser.add_argument("--stop", choices=STOPS, default="sure")
    parser.add_argument("--out", type=Path, default=HERE / "check.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    def show(row: dict) -> None:
        print(
            f"{row['image']:18s} λ {row['lam']:.3f}  stop {row['stop_iteration']}  "
            f"peak {row['psnr_peak']:.2f}  stop {row['psnr_stop']:.2f}  "
            f"final {row['psnr_final']:.2f}  drop {row['drop']:.2f}  gap {row['stop_gap']:.2f}",
            flush=True,
        )

    params = load_params(args.params)
    result = check_unseen(params, args.images.split(","), on_image=show, stop=args.stop)
    print(json.dumps({"summary": result["summary"], "verdicts": result["verdicts"]}, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
