#!/bin/sh
# A second test group of experiment "unseen" (README, section 7), declared in preregistered.md
# before its collection: the first twelve images of the paper's LIVE1 set in the manifest's order,
# leaving out house (House is in the first test group). The grid part of collect.py, unchanged,
# two at a time, niced; scored by analyze.py with the SURE window rule as fixed.
cd "$(dirname "$0")/../.." || exit 1
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
mkdir -p experiments/unseen/test2_curves experiments/unseen/logs
for image in bikes building2 buildings caps carnivaldolls cemetry churchandcapitol \
    coinsinfountain dancers flowersonih35 lighthouse2 lighthouse3; do
    echo "$image"
done | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$0" --part grid \
    --data-root "'"$DATA_ROOT"'" --set deblocking/LIVE1 --out experiments/unseen/test2_curves \
    > experiments/unseen/logs/"$0".test2.log 2>&1'
