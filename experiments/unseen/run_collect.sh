#!/bin/sh
# Step 1 of experiment "unseen": collect.py for every validation image, two at a time (one thread
# each), niced: the machine is shared. Logs go to logs/<image>.log.
cd "$(dirname "$0")/../.." || exit 1
printf '%s\n' moon grass microaneurysms gravel retina brick cell ihc hubble_deep_field coins \
    clock_motion motorcycle_left page text |
    xargs -P 2 -I{} sh -c 'nice -n 10 python experiments/unseen/collect.py {} > experiments/unseen/logs/{}.log 2>&1'
