"""Timings of the framework-free core: augmentation and border weights, tiling and TTA overhead.

    python3 tools/bench_core.py --label data/train/label/0.png      # augmentation on a real label, then tiling
    python3 tools/bench_core.py --size 1024 --repeat 3               # tiling only, on a 1024x1024 image

Augmentation: border_weight_map, elastic_deform (with and without a weight map) and intensity_jitter on
512x512 and 256x256, and how far a deformed weight map lies from one recomputed on the deformed label.
Tiling: predict_tiled with an identity forward, for several tile sizes, with and without TTA.
"""

import argparse
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from isbi_unet.augment import border_weight_map, elastic_deform, intensity_jitter  # noqa: E402
from isbi_unet.errors import DataError  # noqa: E402
from isbi_unet.images import read_gray  # noqa: E402
from isbi_unet.process import run_main  # noqa: E402
from isbi_unet.tiling import predict_tiled  # noqa: E402


def best_ms(repeat, fn, *args, **kwargs):
    """The fastest of `repeat` calls of fn(*args, **kwargs), in ms."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def bench_augment(label_path, repeat):
    raw = read_gray(label_path)
    label = (raw > 127).astype(np.float32)[None]
    rng = np.random.default_rng(0)
    cells = cv2.connectedComponents((raw > 127).astype(np.uint8), connectivity=4)[0] - 1
    t = best_ms(max(1, repeat // 4), border_weight_map, label)
    print(f"border_weight_map {label.shape[2]}x{label.shape[1]}, {cells} cells: {t:.0f} ms")
    weight = border_weight_map(label)
    for side in (512, 256):
        img, lab, wt = label[:, :side, :side] * 0.8, label[:, :side, :side], weight[:, :side, :side]
        t1 = best_ms(repeat, elastic_deform, img, lab, rng)
        t2 = best_ms(repeat, elastic_deform, img, lab, rng, weight=wt)
        t3 = best_ms(repeat, intensity_jitter, img, rng)
        print(f"{side}x{side}: elastic_deform {t1:.1f} ms, with weight map {t2:.1f} ms; intensity_jitter {t3:.1f} ms")
    diffs = []
    for seed in range(5):
        _, lab_d, wt_d = elastic_deform(label, label, np.random.default_rng(seed), weight=weight)
        diffs.append(np.abs(wt_d - border_weight_map(lab_d)))
    diffs = np.stack(diffs)
    print(
        f"deformed vs recomputed weight map (5 draws): mean |diff| {diffs.mean():.4f}, "
        f"99th percentile {np.percentile(diffs, 99):.3f}, mean weight {weight.mean():.3f}"
    )


def bench_tiling(size, repeat):
    image = np.random.default_rng(0).random((1, size, size), dtype=np.float32)
    calls = []

    def identity(x):
        calls.append(x.shape)
        return x

    for tile, overlap in ((0, 0), (256, 64), (576, 64), (128, 32)):
        for tta in (False, True):
            calls.clear()
            ms = best_ms(repeat, predict_tiled, identity, image, tile=tile, overlap=overlap, tta=tta)
            per_run = len(calls) // repeat
            pixels = sum(int(np.prod(s)) for s in calls) / repeat / (8 if tta else 1)
            print(
                f"tile {tile:3d} overlap {overlap:2d} tta {tta!s:5}: {ms:6.1f} ms, {per_run} forward calls, "
                f"{pixels / size**2:.2f}x the image's pixels per orientation"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", help="a label PNG (255 = cell, 0 = membrane): also time augmentation on it")
    p.add_argument("--size", type=int, default=512, help="side of the square image for the tiling timings")
    p.add_argument("--repeat", type=int, default=5, help="timing repeats (the best is shown)")
    args = p.parse_args(argv)
    if args.size < 16 or args.repeat < 1:
        raise DataError("--size must be at least 16 and --repeat at least 1")
    if args.label:
        bench_augment(args.label, args.repeat)
    bench_tiling(args.size, args.repeat)


if __name__ == "__main__":
    run_main(main)
