#!/bin/sh
# Step 1 of experiment "unseen": collect.py for every validation image, two at a time (one thread
# each), niced: the machine is shared. The grid part of 12 images, then the hold-out part of four
# of them (two smooth, two textured), then the grid part of the last two (README: the shared CPU
# left no time for more). Logs go to logs/<image>.<part>.log.
cd "$(dirname "$0")/../.." || exit 1
{
    for image in moon grass microaneurysms gravel retina brick cell ihc hubble_deep_field coins \
        clock_motion motorcycle_left; do
        echo "$image grid"
    done
    for image in moon grass microaneurysms gravel; do echo "$image holdout"; done
    for image in page text; do echo "$image grid"; done
} | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$0" --part "$1" > experiments/unseen/logs/"$0"."$1".log 2>&1'
