#!/bin/sh
# Section 6 of experiment "unseen": does the SURE window rule (w = 50 iterations, fixed at the
# profile's lr = 0.004) stop too early at the paper's lr = 0.001? The grid part of collect.py at
# lr = 0.001 with a 6,000-iteration budget (4× the profile's 1,500, as the lr is 4× smaller), on
# one smooth and one textured validation image, four λ around MC-SURE's picks; two at a time.
cd "$(dirname "$0")/../.." || exit 1
mkdir -p experiments/unseen/lr_curves experiments/unseen/logs
for image in moon grass; do echo "$image"; done | xargs -P 2 -L 1 sh -c 'nice -n 10 python \
    experiments/unseen/collect.py "$0" --part grid --lr 0.001 --iterations 6000 \
    --lams 0.7,0.99,1.4,1.98 --out experiments/unseen/lr_curves \
    > experiments/unseen/logs/"$0".lr.log 2>&1'
