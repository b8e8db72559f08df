#!/usr/bin/env bash
# Set up (.venv, data/), segment the test slices, then draw overlays and a side-by-side figure of the
# first three; every argument goes to predict_unet_test.py.
#
#   bash test.sh                           # checkpoints/best on data/test -> results/NAME.png, results/prob/NAME.png,
#                                          #   results/overlay/NAME.png, results/figure.png
#   bash test.sh --checkpoint checkpoints/last --save_res_path results_last
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
python3 get_data.py
python3 predict_unet_test.py "$@"
# visualize.py reads which images were segmented from the results' run.json; it needs only the folder.
res=results
while [ $# -gt 0 ]; do
    case "$1" in
        --save_res_path | --save-res-path) res="${2:-}"; shift ;;
        --save_res_path=* | --save-res-path=*) res="${1#*=}" ;;
    esac
    shift
done
python3 visualize.py --res_path "$res"
