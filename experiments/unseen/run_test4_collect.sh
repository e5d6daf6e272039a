#!/bin/sh
# A fourth test group of experiment "unseen" (README, section 9), declared in preregistered.md
# before its collection: colour Set14 in the manifest's order without baboon, lenna, monarch and
# pepper (scenes of earlier groups), then baby and bird of colour Set5. The grid part of
# collect.py, unchanged, two at a time, niced; scored by analyze.py with every rule as it stands.
cd "$(dirname "$0")/../.." || exit 1
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
mkdir -p experiments/unseen/test4_curves experiments/unseen/logs
{
    for image in barbara bridge coastguard comic face flowers foreman man ppt3 zebra; do
        echo "sr/CSet14 $image"
    done
    for image in baby bird; do
        echo "sr/CSet5 $image"
    done
} | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$1" --part grid \
    --data-root "'"$DATA_ROOT"'" --set "$0" --out experiments/unseen/test4_curves \
    > experiments/unseen/logs/"$1".test4.log 2>&1'
