"""benchmark.py's volume mode: predict_unet_test.py on TIFF stacks built from ISBI slices, timed, with the peak
memory of all its processes together.

Stacks are made by tiling real 512x512 slices into SIDE x SIDE pages (uncompressed uint8 TIFF, as microscopes
write them) until the stack holds the asked megabytes. Each run is the real command in its own process group; a
thread samples the resident memory of the whole process tree (parent and workers, summed, every 50 ms) and keeps
the highest sum. Megapixels per second count the input's pixels over the command's wall time (start-up included).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from isbi_unet.errors import DataError
from isbi_unet.images import list_images, read_gray

SAMPLE_SECONDS = 0.05


def build_stack(path, slices_dir, side, megabytes):
    """A uint8 TIFF stack of SIDE x SIDE pages, each a mosaic of ISBI slices, holding about `megabytes` MB."""
    import tifffile

    names = list_images(slices_dir)
    tiles = [read_gray(os.path.join(slices_dir, n)) for n in names]
    pages = max(1, round(megabytes * 2**20 / side**2))
    with tifffile.TiffWriter(path, bigtiff=pages * side**2 > 2**32 - 2**25) as tiff:
        for z in range(pages):
            tiff.write(mosaic(tiles, side, z), photometric="minisblack", contiguous=True)
    return pages


def mosaic(tiles, side, offset):
    """SIDE x SIDE from the slices in turn (starting at `offset`), each mirrored where the mosaic needs more."""
    h, w = tiles[0].shape
    page = np.empty((side, side), np.uint8)
    k = offset
    for y in range(0, side, h):
        for x in range(0, side, w):
            tile = tiles[k % len(tiles)]
            page[y : y + h, x : x + w] = tile[: side - y, : side - x]
            k += 1
    return page


def tree_rss(root):
    """Resident bytes of process `root` and all its descendants, summed (Linux /proc)."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(cmd, cwd):
    """(seconds, peak summed RSS bytes, completed process) of `cmd`."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.time() - start
    sampler.join()
    return seconds, peak[0], subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def predict_row(script, checkpoint, stack, out, workers, extra, pixels):
    cmd = [sys.executable, script, "--checkpoint", checkpoint, "--Test_Data_path", stack, "--save_res_path", out]
    cmd += ["--workers", str(workers), *extra]
    seconds, peak, proc = run_measured(cmd, os.path.dirname(script))
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{stack}: predict_unet_test.py failed with {workers} worker(s): {tail}")
    with open(os.path.join(out, "run.json")) as f:
        blocks = json.load(f)["blocks"]
    return {
        "workers": workers,
        "flags": " ".join(extra),
        "seconds": seconds,
        "mpx_per_s": pixels / 1e6 / seconds,
        "peak_mb": peak / 2**20,
        "block_side": blocks["core"],
        "blocks": blocks["count"],
    }


def volume_benchmark(
    script, checkpoint, slices_dir, scratch, side, sizes_mb, workers, whole_memory=None, engine="auto"
):
    """Rows for every stack size and worker count (and, with `whole_memory`, the smallest stack with one block per
    slice under that --max_memory, for the blockwise overhead)."""
    rows = []
    for megabytes in sizes_mb:
        stack = os.path.join(scratch, f"stack_{side}_{megabytes}MB.tif")
        pages = build_stack(stack, slices_dir, side, megabytes)
        pixels = pages * side * side
        runs = [(w, ["--engine", engine]) for w in workers]
        if whole_memory and megabytes == min(sizes_mb):
            runs.append((1, ["--engine", engine, "--max_memory", str(whole_memory)]))
        for w, extra in runs:
            out = os.path.join(scratch, f"out_{side}_{megabytes}_{w}_{len(extra)}")  # len: the whole run's own
            row = predict_row(script, checkpoint, stack, out, w, extra, pixels)
            shutil.rmtree(out)
            rows.append({"size_mb": round(pixels / 2**20), "slices": pages, "side": side, **row})
            print(f"... {rows[-1]}", file=sys.stderr, flush=True)
        os.remove(stack)
    return rows


def print_volume_table(rows):
    print(
        f"{'input MB':>9} {'slices':>7} {'side':>6} {'workers':>8} {'flags':<18} {'block':>6} {'blocks':>7} "
        f"{'seconds':>8} {'Mpx/s':>7} {'peak MB':>8}"
    )
    for r in rows:
        print(
            f"{r['size_mb']:>9} {r['slices']:>7} {r['side']:>6} {r['workers']:>8} {r['flags']:<18} "
            f"{r['block_side']:>6} {r['blocks']:>7} {r['seconds']:>8.1f} {r['mpx_per_s']:>7.2f} {r['peak_mb']:>8.0f}"
        )
