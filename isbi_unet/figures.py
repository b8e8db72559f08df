"""Figures written headless: a training log's curves, and PNG output of any matplotlib figure."""

import csv
import io
import math
import os

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402  (comes with matplotlib)
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from isbi_unet.errors import DataError, atomic_write  # noqa: E402
from isbi_unet.formats import KIND_KEY, LOSSES, METRICS  # noqa: E402

MEMBRANE_BGR = (255, 0, 255)  # magenta: stands out on grey, and for red-green colour blindness
ALPHA = 0.45


PLOTTABLE = 1e100


def number(text):
    # Blank cells (a metric not computed that epoch) and inf (a diverged loss) are gaps in the curve, not errors;
    # so are numbers beyond PLOTTABLE, whose spread overflows matplotlib's tick arithmetic (1e308 and -1e308).
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if abs(value) <= PLOTTABLE else math.nan


def log_rows(path):
    """(header, rows as dicts) of log.csv `path`, as a spreadsheet may have saved it (a byte-order mark, CRLF);
    a file that is not a training log is one DataError line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if any((v or "").strip() for v in row.values())]
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error):
        raise DataError(f"{path}: not a training log (not CSV text)") from None
    if "epoch" not in header or "train_loss" not in header:
        raise DataError(f"{path}: not a training log (expected epoch and train_loss columns)")
    for i, row in enumerate(rows, 2):
        if not (row["epoch"] or "").strip().isdigit():
            raise DataError(f"{path}: line {i}: epoch {row['epoch']!r} is not a whole number")
    return header, rows


def read_log(path):
    """The log's epoch, loss and metric columns as lists of floats (NaN where a cell is blank)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such log (train first with TrainUnetDataSet.py)")
    _, rows = log_rows(path)
    if not rows:
        raise DataError(f"{path}: not a training log (no rows)")
    return {k: [number(r[k]) for r in rows] for k in ("epoch", *LOSSES, *METRICS) if k in rows[0]}


def has_values(columns, key):
    return any(not math.isnan(v) for v in columns.get(key, []))


def draw(ax, columns, names):
    for key, label in names.items():
        if has_values(columns, key):
            ax.plot(columns["epoch"], columns[key], marker=".", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_losses(columns, out):
    """Writes the figure to `out`; returns each panel's curve labels."""
    metrics = any(has_values(columns, k) for k in METRICS)
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), dpi=120, squeeze=False)
    draw(axes[0, 0], columns, LOSSES)
    axes[0, 0].set_ylabel("loss")  # whichever --loss the run trained with
    axes[0, 0].set_title("U-Net on ISBI 2012: loss")
    if metrics:
        draw(axes[0, 1], columns, METRICS)
        axes[0, 1].set_ylim(0, 1)
        axes[0, 1].set_title("validation: V_rand, V_info higher, pixel error lower is better", fontsize=9)
    fig.tight_layout()
    labels = [[line.get_label() for line in ax.get_lines()] for ax in axes[0]]
    save_figure(fig, out, "loss plot")
    return labels


def save_figure(fig, out, kind, palette=False):
    """Writes `fig` to PNG `out` and closes it; a failed write is a WriteError naming `out`.

    kind: stored in the PNG (isbi_unet.outputs), so a later run knows the file as its own to replace.
    palette: quantise to 256 colours, for figures of grey panels with one tint, which a noisy EM slice
    otherwise keeps from compressing.
    """
    try:
        with atomic_write(out, f"the {kind}") as tmp:  # a full disk must not leave half a PNG in place of the old
            if palette:
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png")
                info = PngInfo()
                info.add_text(KIND_KEY, kind)
                Image.open(buffer).convert("RGB").quantize(256).save(tmp, format="png", optimize=True, pnginfo=info)
            else:
                fig.savefig(tmp, format="png", metadata={KIND_KEY: kind})
    finally:
        plt.close(fig)


def overlay(image, mask):
    """The grey slice in colour, predicted membrane (mask 0) blended with MEMBRANE_BGR."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR).astype(np.float32)
    membrane = mask <= 127
    out[membrane] = (1 - ALPHA) * out[membrane] + ALPHA * np.array(MEMBRANE_BGR, np.float32)
    return np.round(out).astype(np.uint8)
