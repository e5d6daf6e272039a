#!/usr/bin/env bash
# The prepared GPU checks of issue 9, for a session lent a CUDA machine (the device tool's `run`).
# Three parts, each one call well under the 10-minute limit; a 15-minute session (start-up
# included) fits `suite` and `walltime`, `accuracy` takes a second one. Logs and JSON go to $OUT:
#
#   bash bench/gpu_session.sh suite      # the step suite, python -m bench.run --gpu (≈ 7 min)
#   bash bench/gpu_session.sh walltime   # item 2: `sdip fit` of 2,000 iterations in tf32 and bf16,
#                                        # process, fit and start-up times (≈ 2 min)
#   bash bench/gpu_session.sh accuracy   # item 1: fp32 / tf32 / bf16 peak PSNR over 3 seeds of
#                                        # 2,000-iteration fits at 512² (≈ 8 min, cut at 9)
#
# Needs only what the H200 image has (torch, numpy, scikit-image, Pillow, h5py, click, pyyaml,
# pandas, tqdm): `sdip fit` and the benchmarks import neither MLflow nor Optuna nor DVC. The image
# is scikit-image's astronaut (512² RGB), so nothing has to be carried.
# Shrunk on a CPU to try the script itself: DEVICE=cpu ITERATIONS=4 SIZE=64 bash … walltime
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_session}" DEVICE="${DEVICE:-cuda}" ITERATIONS="${ITERATIONS:-2000}"
SIZE="${SIZE:-512}"
mkdir -p "$OUT"
part="${1:?usage: bench/gpu_session.sh suite|walltime|accuracy}"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || true
} >"$OUT/env-$part.txt" 2>&1

timed_fit() {  # timed_fit PRECISION: one `sdip fit`, its process, fit and start-up seconds
  local precision=$1 start end
  rm -rf "/tmp/fit-$precision"
  start=$(date +%s.%N)
  timeout 150 python3 -m stages fit denoising /tmp/astronaut.png --sigma 25 \
    --iterations "$ITERATIONS" --lam 1.4 --upsample gaussian --device "$DEVICE" \
    --precision "$precision" -o "/tmp/fit-$precision"
  end=$(date +%s.%N)
  python3 - "$precision" "$start" "$end" <<'EOF'
import json, sys
from pathlib import Path
precision, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
path = Path(f"/tmp/fit-{precision}/summary.json")
if not path.is_file():
    sys.exit(f"error: the {precision} fit wrote no summary (see its output above)")
summary = json.loads(path.read_text())
fit_s, total = summary["wall_time_s"], end - start
print(json.dumps({
    "precision": precision, "process_s": round(total, 3), "fit_s": fit_s,
    "startup_s": round(total - fit_s, 3), "iterations": summary["iterations_run"],
    "ms_per_iteration": round(1e3 * fit_s / summary["iterations_run"], 3),
    "psnr_best": summary["psnr_best"], "stop_iteration": summary["stop_iteration"],
}))
EOF
}

case "$part" in
  suite)
    timeout 480 python3 -m bench.run --gpu --out "$OUT/results_gpu.json" 2>&1 | tee "$OUT/suite.log"
    ;;
  walltime)
    python3 -c "from bench.precision import astronaut; from pipeline.imageio import save_image; \
save_image('/tmp/astronaut.png', astronaut($SIZE))"
    for precision in tf32 bf16; do timed_fit "$precision"; done 2>&1 | tee "$OUT/walltime.log"
    ;;
  accuracy)
    timeout 540 python3 -m bench.precision --size "$SIZE" --iterations "$ITERATIONS" \
      --device "$DEVICE" --out "$OUT/precision.json" 2>&1 | tee "$OUT/precision.log"
    ;;
  *)
    echo "error: unknown part $part (suite, walltime or accuracy)" >&2
    exit 2
    ;;
esac
