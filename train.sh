#!/usr/bin/env bash
# Set up (.venv, data/), then train; every argument goes to TrainUnetDataSet.py.
#
#   bash train.sh                          # recipe by device: full on a GPU, the 2-core CPU recipe otherwise
#   bash train.sh --epochs 5 --width 8     # any TrainUnetDataSet.py flag overrides the recipe
#   NPROC=8 bash train.sh                  # data-parallel: python3 -m isbi_unet.launch --nproc_per_node 8
#   NPROC=1 bash train.sh --graph          # one process through nn.Graph
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash train.sh   # on node 0; NODE_RANK=1 on node 1
#
# NPROC defaults to 1 with a CUDA device and otherwise to the number of CPU cores (at most 4): OneFlow's
# eager CPU kernels keep about one core busy, so a process per core is how a CPU trains at full speed
# (the rule is isbi_unet/device.py's, shared with predict_unet_test.py --workers). isbi_unet.launch is OneFlow's
# launcher, except that Ctrl-C stops every rank at the same step and the job exits with the ranks' own code.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
python3 get_data.py
NPROC="${NPROC:-$(python3 -m isbi_unet.device 2>/dev/null)}"  # 1 on a GPU, else one per core (at most 4)
case "$NPROC" in
    "" | *[!0-9]* | 0 | 0*) echo "error: NPROC must be a whole number of processes, 1 or more, got '$NPROC'" >&2; exit 2 ;;
esac
NODES=()  # several machines (docs/several_machines.md): each set variable becomes the launcher's flag
for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
    if [ -n "${!v:-}" ]; then NODES+=("--$(echo "$v" | tr A-Z a-z)" "${!v}"); fi
done
if [ "$NPROC" -gt 1 ] || [ ${#NODES[@]} -gt 0 ]; then
    echo "train.sh: $NPROC processes through isbi_unet.launch (OneFlow's launcher) ${NODES[*]:-}"
    python3 -m isbi_unet.launch ${NODES[@]+"${NODES[@]}"} --nproc_per_node "$NPROC" TrainUnetDataSet.py "$@"
else
    python3 TrainUnetDataSet.py "$@"
fi
