#!/usr/bin/env bash
# The prepared GPU checks of issue 9, for a session lent a CUDA machine (the device tool's `run`),
# in two calls of under ten minutes each; every log and result goes under $OUT:
#
#   bash bench/gpu_session.sh accuracy   # item 1: fp32 / tf32 / bf16 peaks over 3 seeds of
#                                        # 2,000-iteration fits at 512² (≈ 5 min); item 2: `sdip
#                                        # fit`'s wall time over 2,000 iterations, start-up apart
#   bash bench/gpu_session.sh suite      # the step suite: python -m bench.run --gpu (≈ 8 min)
#
# Needs only what the H200 image has (torch, numpy, scikit-image, click, pyyaml, pandas, tqdm):
# `sdip fit` and the benchmarks import neither MLflow nor Optuna nor DVC. The image is
# scikit-image's astronaut (512² RGB), so nothing has to be carried.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
part="${1:?usage: bench/gpu_session.sh accuracy|suite}"
# Shrunk on a CPU to try the script itself: DEVICE=cpu ITERATIONS=4 SIZE=64 bash … accuracy
DEVICE="${DEVICE:-cuda}" ITERATIONS="${ITERATIONS:-2000}" SIZE="${SIZE:-512}"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || true
} >"$OUT/env-$part.txt" 2>&1

timed_fit() {  # timed_fit PRECISION: one `sdip fit` (2,000 iterations), wall time and start-up
  local precision=$1 start end
  start=$(date +%s.%N)
  timeout 150 python3 -m stages fit denoising /tmp/astronaut.png --sigma 25 \
    --iterations "$ITERATIONS" --lam 1.4 --upsample gaussian --device "$DEVICE" \
    --precision "$precision" -o "/tmp/fit-$precision"
  end=$(date +%s.%N)
  python3 - "$precision" "$start" "$end" <<'EOF'
import json, sys
precision, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
summary = json.load(open(f"/tmp/fit-{precision}/summary.json"))
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
  accuracy)
    timeout 330 python3 -m bench.precision --size "$SIZE" --iterations "$ITERATIONS" \
      --device "$DEVICE" --out "$OUT/precision.json" 2>&1 | tee "$OUT/precision.log"
    python3 -c "from skimage import data, io; io.imsave('/tmp/astronaut.png', data.astronaut())"
    for precision in tf32 bf16; do
      rm -rf "/tmp/fit-$precision"
      timed_fit "$precision"
    done 2>&1 | tee "$OUT/fit_wall_time.log"
    ;;
  suite)
    timeout 560 python3 -m bench.run --gpu --out "$OUT/results_gpu.json" 2>&1 | tee "$OUT/suite.log"
    ;;
  *)
    echo "error: unknown part $part (accuracy or suite)" >&2
    exit 2
    ;;
esac
