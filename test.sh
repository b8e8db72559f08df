#!/usr/bin/env bash
# Set up (.venv, data/), then segment the test slices; every argument goes to predict_unet_test.py.
#
#   bash test.sh                           # checkpoints/best on data/test -> results/NAME.png, results/prob/NAME.png
#   bash test.sh --checkpoint checkpoints/last --save_res_path results_last
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
python3 get_data.py
python3 predict_unet_test.py "$@"
