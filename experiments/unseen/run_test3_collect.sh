#!/bin/sh
# A third test group of experiment "unseen" (README, section 8), declared in preregistered.md
# before its collection: the next twelve images of the paper's LIVE1 set in the manifest's order,
# after the second group (house left out). The grid part of collect.py, unchanged,
# two at a time, niced; scored by analyze.py with the rule preregistered for it.
cd "$(dirname "$0")/../.." || exit 1
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
mkdir -p experiments/unseen/test3_curves experiments/unseen/logs
for image in manfishing monarch ocean paintedhouse parrots plane rapids sailing1 sailing2 \
    sailing3 sailing4 statue; do
    echo "$image"
done | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$0" --part grid \
    --data-root "'"$DATA_ROOT"'" --set deblocking/LIVE1 --out experiments/unseen/test3_curves \
    > experiments/unseen/logs/"$0".test3.log 2>&1'
