#!/usr/bin/env bash
# The README's pictures, from a finished training run (with the venv active: source setup.sh):
#   OUT/loss.png     plot.py on CHECKPOINT_DIR/log.csv
#   OUT/figure.png   CHECKPOINT_DIR/best on the run's held-out slices: image | label | prediction | overlay
#   OUT/overlay.png  the first of those overlays
#
#   bash tools/make_docs.sh checkpoints           # OUT is docs/
#   bash tools/make_docs.sh checkpoints /tmp/pictures
set -euo pipefail
ckpt="$(realpath "${1:?usage: bash tools/make_docs.sh CHECKPOINT_DIR [OUT]}")"
out="$(realpath -m "${2:-$(dirname "$0")/../docs}")"
cd "$(dirname "$0")/.."
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The held-out block exactly as training chose it, from the run's own config.json.
python3 - "$ckpt/config.json" "$tmp" <<'PY'
import json, os, sys
from isbi_unet.images import split_names
config, tmp = json.load(open(sys.argv[1])), sys.argv[2]
os.makedirs(f"{tmp}/image")
for name in split_names(config["data_path"], config["val_slices"], config.get("val_start", -1))[1]:
    os.symlink(os.path.abspath(os.path.join(config["data_path"], "image", name)), f"{tmp}/image/{name}")
print(config["data_path"], file=open(f"{tmp}/data_path", "w"))
PY
data="$(cat "$tmp/data_path")"
python3 predict_unet_test.py --checkpoint "$ckpt/best" --Test_Data_path "$tmp/image" --save_res_path "$tmp/res"
python3 visualize.py --res_path "$tmp/res" --label_path "$data/label" --n 2 --dpi 60 --palette \
    --figure "$out/figure.png" --overlay_dir "$tmp/overlay" --max_side 224
cp "$(ls "$tmp"/overlay/*.png | sort -V | head -1)" "$out/overlay.png"
python3 plot.py --log "$ckpt/log.csv" --out "$out/loss.png"
