#!/bin/sh
# A fifth test group of experiment "unseen" (README, section 10), declared in preregistered.md
# before its collection: the eight bundled images no earlier group used whose scene is new. The
# grid part of collect.py with four divergence probes (the first probe's members are those of the
# plain grid part, bit for bit), two at a time, niced; scored by analyze.py as it stands.
# Set5's woman is recorded as woman_set5 (LIVE1 has a woman too).
cd "$(dirname "$0")/../.." || exit 1
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
mkdir -p experiments/unseen/test5_curves experiments/unseen/logs
{
    for image in stream studentsculpture woman womanhat; do echo "deblocking/LIVE1 $image $image"; done
    for image in butterfly head; do echo "sr/CSet5 $image $image"; done
    echo "sr/CSet5 woman woman_set5"
    echo "deblocking/classic5 boats boats"
} | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$1" --name "$2" \
    --part grid --probes 4 --data-root "'"$DATA_ROOT"'" --set "$0" \
    --out experiments/unseen/test5_curves > experiments/unseen/logs/"$2".test5.log 2>&1'
