"""Draw the loss curve of a training run to a PNG (headless).

    python3 plot.py                                   # reads checkpoints/log.csv, writes checkpoints/loss.png
    python3 plot.py --log checkpoints/log.csv --out loss.png
"""
import argparse
import csv
import math
import os

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from errors import DataError, run_main  # noqa: E402


def read_log(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such log (train first with TrainUnetDataSet.py)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "epoch" not in rows[0] or "train_loss" not in rows[0]:
        raise DataError(f"{path}: not a training log (expected epoch and train_loss columns with rows)")
    columns = {k: [float(r[k]) for r in rows] for k in rows[0] if k in ("epoch", "train_loss", "val_loss")}
    return columns


def plot_losses(columns, out):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(columns["epoch"], columns["train_loss"], marker=".", label="train loss")
    val = columns.get("val_loss", [])
    if val and not all(math.isnan(v) for v in val):
        ax.plot(columns["epoch"], val, marker=".", label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("binary cross-entropy")
    ax.set_title("U-Net on ISBI 2012")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="checkpoints/log.csv", help="log.csv written by TrainUnetDataSet.py")
    p.add_argument("--out", help="PNG to write (default: loss.png beside the log)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.log) or ".", "loss.png")
    plot_losses(read_log(args.log), out)
    print(out)


if __name__ == "__main__":
    run_main(main)
