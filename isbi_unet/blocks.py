"""Blocks of a slice that reproduce the whole-image pass: the geometry and the standardisation, NumPy only.

    blocks = plan_blocks((H, W), side)            # cores on the 16-px grid, covering the slice once
    wy0, wy1, wx0, wx1 = read_window(block, (H, W), HALO)[0]   # the core grown by the halo, clipped
    x = standardise(window, stats)                # float32 1xhxw, exactly as images.preprocess on the slice

The whole-image pass (images.preprocess, then tiling.predict_tiled with tile 0) standardises the slice with its
own mean and std, mirrors (reflect-101) the bottom and right up to a multiple of 16, runs the net (zero padding
at the edges of what it is given) and crops back. A block gives the same numbers when its core starts on the
16-px pooling grid, its window reaches HALO px beyond the core on every side, clipped to the padded slice
[0, Hp) x [0, Wp) (so at an image border it sees the border the whole pass sees), the rows/columns past H/W are
the slice's own reflect-101 ones, and it is standardised with the whole slice's statistics (SliceStats).
"""

from typing import NamedTuple

import numpy as np

from isbi_unet.formats import POOL, round_up

# Context per side that makes a block's probabilities equal the whole-image pass for this U-Net (4 poolings, 3x3
# convolutions, zero padding): measured on ISBI slices, tile-vs-whole maximum difference 32 px: 0.20, 48: 0.086,
# 64: 0.029, 80: 0.0008, 96: exactly 0 (tools/halo.py re-measures it). A multiple of POOL, so windows stay on
# the pooling grid.
HALO = 96

# Slices up to this many pixels get their statistics as images.preprocess computes them (float32, whole slice
# in memory: 2048x2048 is 16 MB), so the default run on ordinary slices is today's whole-image pass bit for bit;
# bigger ones are summed in row bands in float64 (exact sums of integers), never held whole.
EXACT_STATS_PIXELS = 2048 * 2048
STATS_ROWS = 256  # rows per band of the streaming statistics pass


class Block(NamedTuple):
    """The core a block writes: slice z, rows [y0, y1), columns [x0, x1), image coordinates."""

    z: int
    y0: int
    y1: int
    x0: int
    x1: int


class SliceStats(NamedTuple):
    """The whole slice's mean and std on the model's 0..1 scale, and how raw values reach it: `bits` is the
    8-bit conversion of a uint16 slice (images.to_8_bit, from the bits its values use); 8 for uint8; 0 for a
    float slice, whose values are taken as already on the 0..1 scale."""

    mean: float
    std: float
    bits: int = 8


def padded_shape(shape_hw):
    """(Hp, Wp): the slice padded to the pooling grid, as the whole-image pass feeds it."""
    return tuple(round_up(n, POOL) for n in shape_hw)


def axis_cores(length, side):
    """[(start, end)] covering [0, length) in the fewest cores of at most `side`, as even as the 16-px grid allows
    (2048 at 1680: two of 1024, not 1680 + 368, so windows are smaller for the same count)."""
    count = -(-length // side)
    step = round_up(-(-length // count), POOL)
    starts = list(range(0, length, step))
    return list(zip(starts, starts[1:] + [length]))


def plan_blocks(shape_hw, side):
    """The blocks of one slice of (H, W) with cores of `side` (a multiple of POOL; z = 0, the caller sets it),
    row-major."""
    if side < POOL or side % POOL:
        raise ValueError(f"block side must be a positive multiple of {POOL}, got {side}")
    h, w = shape_hw
    return [Block(0, y0, y1, x0, x1) for y0, y1 in axis_cores(h, side) for x0, x1 in axis_cores(w, side)]


def read_window(block, shape_hw, halo=HALO):
    """((wy0, wy1, wx0, wx1), (cy, cx)): the window a block reads (core grown by `halo`, clipped to the padded
    slice) and the core's offset inside it. Every window edge is a multiple of POOL."""
    hp, wp = padded_shape(shape_hw)
    wy0, wx0 = max(0, block.y0 - halo), max(0, block.x0 - halo)
    wy1 = hp if block.y1 >= shape_hw[0] else min(hp, block.y1 + halo)
    wx1 = wp if block.x1 >= shape_hw[1] else min(wp, block.x1 + halo)
    return (wy0, wy1, wx0, wx1), (block.y0 - wy0, block.x0 - wx0)


def reflect_index(index, length):
    """Source row/column of padded index `index` (reflect-101 past the end: row H+k is row H-2-k)."""
    return np.where(index < length, index, 2 * (length - 1) - index)


def window_reads(window, shape_hw):
    """(ys, xs, rows, cols): the in-image slices to read for `window`, and the index arrays that expand what was
    read into the window (reflect-101 rows/columns past the image's end)."""
    (wy0, wy1, wx0, wx1), (h, w) = window, shape_hw
    rows, cols = reflect_index(np.arange(wy0, wy1), h), reflect_index(np.arange(wx0, wx1), w)
    ry0, ry1 = int(rows.min()), int(rows.max()) + 1
    rx0, rx1 = int(cols.min()), int(cols.max()) + 1
    return slice(ry0, ry1), slice(rx0, rx1), rows - ry0, cols - rx0


def read_padded(read, window, shape_hw):
    """The window's pixels through `read(ys, xs)` (a source's in-image reader), padded past the end as the
    whole-image pass pads."""
    ys, xs, rows, cols = window_reads(window, shape_hw)
    part = read(ys, xs)
    if len(rows) == part.shape[0] and len(cols) == part.shape[1]:
        return part
    return part[np.ix_(rows, cols)]


def to_unit(window, stats):
    """Raw pixels -> float32 on the model's 0..1 scale, pixel by pixel as images.read_gray and to_unit do."""
    if window.dtype == np.uint8:
        return window.astype(np.float32) / 255.0
    if window.dtype == np.uint16:  # images.to_8_bit with the whole slice's bit count, then /255
        eight = (window.astype(np.float32) * (255.0 / (2**stats.bits - 1)) + 0.5).astype(np.uint8)
        return eight.astype(np.float32) / 255.0
    return window.astype(np.float32)


def standardise(window, stats):
    """float32 1xhxw: the window standardised with the whole slice's statistics, as images.standardize computes
    it on the whole slice (same float32 operations, so the same numbers)."""
    x = to_unit(window, stats)
    return ((x - np.float32(stats.mean)) / max(float(stats.std), 1e-6)).astype(np.float32)[None]


def bits_of(maximum):
    """The bit count images.to_8_bit keeps for a uint16 slice whose largest value is `maximum`."""
    return max(8, int(maximum).bit_length())


def exact_stats(image):
    """SliceStats of a slice held whole, computed as images.preprocess does (float32 mean and std)."""
    bits = bits_of(image.max()) if image.dtype == np.uint16 else (8 if image.dtype == np.uint8 else 0)
    stats = SliceStats(0.0, 1.0, bits)
    x = to_unit(image, stats)
    return SliceStats(x.mean(), float(x.std()), bits)


def streaming_stats(read_rows, shape_hw, dtype, rows=STATS_ROWS):
    """SliceStats of a slice read in bands of `rows` rows through `read_rows(ys) -> 2-D array` (float64 sums;
    a uint16 slice is read twice, for its bit count first)."""
    h, w = shape_hw
    bands = [slice(y, min(h, y + rows)) for y in range(0, h, rows)]
    bits = 8 if dtype == np.uint8 else 0
    if dtype == np.uint16:
        bits = bits_of(max(int(read_rows(b).max()) for b in bands))
    stats = SliceStats(0.0, 1.0, bits)
    total = square = 0.0
    for band in bands:
        x = to_unit(read_rows(band), stats).astype(np.float64)
        total += x.sum()
        square += np.square(x).sum()
    mean = total / (h * w)
    return SliceStats(mean, float(np.sqrt(max(square / (h * w) - mean * mean, 0.0))), bits)


def block_side(budget_bytes, bytes_per_pixel, shape_hw=None, halo=HALO, in_flight=1):
    """The largest core side (a multiple of POOL) whose window, `in_flight` at once, fits `budget_bytes` at
    `bytes_per_pixel` of the forward pass; never more than the padded slice needs (one block then covers it).
    0 when not even a POOL-px core fits."""
    pixels = budget_bytes / (bytes_per_pixel * in_flight)
    side = int((np.sqrt(max(pixels, 0.0)) - 2 * halo) // POOL * POOL)
    if shape_hw is not None:
        side = min(side, max(padded_shape(shape_hw)))
    return max(side, 0)


def window_pixels(side, halo=HALO):
    """Pixels of the largest window a core of `side` reads."""
    return (side + 2 * halo) ** 2
