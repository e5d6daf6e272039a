#!/bin/sh
# Step 1 of experiment "unseen": collect.py for every validation image, two at a time (one thread
# each), niced: the machine is shared. First the grid part of all images, then the hold-out part
# of as many as time allows (README: which ones). Logs go to logs/<image>.<part>.log.
cd "$(dirname "$0")/../.." || exit 1
IMAGES="moon grass microaneurysms gravel retina brick cell ihc hubble_deep_field coins clock_motion motorcycle_left page text"
{
    for image in $IMAGES; do echo "$image grid"; done
    for image in $IMAGES; do echo "$image holdout"; done
} | xargs -P 2 -L 1 sh -c 'nice -n 10 python experiments/unseen/collect.py "$0" --part "$1" > experiments/unseen/logs/"$0"."$1".log 2>&1'
