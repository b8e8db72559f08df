#!/usr/bin/env bash
# Set up (.venv, data/), then train; every argument goes to TrainUnetDataSet.py.
#
#   bash train.sh                          # recipe by device: full on a GPU, the 2-core CPU recipe otherwise
#   bash train.sh --epochs 5 --width 8     # any TrainUnetDataSet.py flag overrides the recipe
#   NPROC=8 bash train.sh                  # data-parallel: python3 -m oneflow.distributed.launch --nproc_per_node 8
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
python3 get_data.py
NPROC="${NPROC:-1}"
if [ "$NPROC" -gt 1 ]; then
    echo "train.sh: $NPROC processes through oneflow.distributed.launch"
    python3 -m oneflow.distributed.launch --nproc_per_node "$NPROC" TrainUnetDataSet.py "$@"
else
    python3 TrainUnetDataSet.py "$@"
fi
