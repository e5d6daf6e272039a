#!/bin/sh
# The test group of experiment "unseen" (README, section 5): the grid part of collect.py on the
# CPU profile's own two denoising images (bundled) and on the paper's nine denoising images
# (DATA_ROOT, default ../shared/datasets), two at a time, niced. The stopping rules and the λ
# criteria were chosen on curves/ before these curves existed; test_curves/ only scores them.
cd "$(dirname "$0")/../.." || exit 1
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
mkdir -p experiments/unseen/test_curves experiments/unseen/logs
{
    for image in astronaut coffee; do echo "$image"; done
    for image in image_Baboon512rgb image_F16_512rgb image_House256rgb image_Lena512rgb \
        image_Peppers512rgb kodim01 kodim02 kodim03 kodim12; do
        echo "$image --data-root $DATA_ROOT"
    done
} | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$0" "$@" --part grid \
    --out experiments/unseen/test_curves > experiments/unseen/logs/"$0".test.log 2>&1'
