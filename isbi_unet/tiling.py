"""Inference as in the U-Net paper: mirrored borders, overlapping tiles, optional 8-fold test-time augmentation.

    predict_tiled(forward, image)                   cell probability for one preprocessed slice
    write_isbi_tiff(path, probs)                    all slices as one ISBI 2012 submission stack

`forward` is any function from a float32 numpy batch Nx1xhxw to probabilities of the same shape (the
caller wraps model + sigmoid), so this module needs no model and no framework.
"""

import numpy as np

from isbi_unet.errors import DataError
from isbi_unet.formats import POOL, round_up
from isbi_unet.images import dihedral, inverse_dihedral
from isbi_unet.stacks import STACK_EXTS, write_stack


def check_tiling(tile, overlap, batch):
    if tile is not None and tile != 0 and (tile < POOL or tile % POOL):
        raise DataError(f"tile must be a multiple of {POOL} (four 2x2 poolings), or 0 for the whole image; got {tile}")
    if tile and not 0 <= overlap <= tile - POOL:
        raise DataError(f"overlap must lie between 0 and tile - {POOL} = {tile - POOL}; got {overlap}")
    if batch < 1:
        raise DataError(f"batch must be at least 1; got {batch}")


def axis_plan(length, tile, overlap):
    """Along one axis: (pad_before, pad_after, tile_size, starts, effective overlap).

    The step between tiles is tile - overlap rounded down to a multiple of 16 (the overlap grows to
    match), so every tile sees the same pooling grid. The mirrored margin before the image is half
    the overlap rounded up to a multiple of 16: border pixels get as much context as pixels where two
    tiles meet, and the grid stays aligned with the image's first pixel, as when the whole image is
    fed at once. Whole-image mode (tile 0) pads after the image only, to a multiple of 16.
    """
    if not tile:
        size = round_up(length, POOL)
        return 0, size - length, size, [0], 0
    step = (tile - overlap) // POOL * POOL
    overlap = tile - step
    margin = round_up(overlap // 2, POOL)
    n = max(1, -(-(length + 2 * margin - tile) // step) + 1)
    padded = tile + (n - 1) * step
    return margin, padded - length - margin, tile, [k * step for k in range(n)], overlap


def ramp(size, overlap):
    """1-D blend weights: 0 within overlap/4 of either end, rising linearly to 1 at 3*overlap/4.

    Where two tiles overlap by `overlap` px the two ramps add up to 1, a cross-fade centred in the
    overlap. The outer quarter is dropped entirely: those pixels sit at a tile edge with the least
    context and the network's zero padding, the ones the paper's overlap-tile strategy never uses.
    The mirrored margin and the step guarantee that every image pixel still has positive total weight.
    """
    if overlap == 0:
        return np.ones(size)
    depth = np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5
    return np.clip((depth - overlap / 4) / (overlap / 2), 0.0, 1.0)


def predict_once(forward, image, tile, overlap, batch):
    """Blended tiled prediction of one orientation; float32 1xHxW."""
    h, w = image.shape[-2:]
    top, bottom, th, ys, oy = axis_plan(h, tile, overlap)
    left, right, tw, xs, ox = axis_plan(w, tile, overlap)
    padded = np.pad(image[0], ((top, bottom), (left, right)), mode="reflect")  # = cv2.BORDER_REFLECT_101
    window = np.outer(ramp(th, oy), ramp(tw, ox))
    total = np.zeros(padded.shape)  # float64: sum(w * p) / sum(w) then gives p back exactly when tiles agree
    norm = np.zeros(padded.shape)
    origins = [(y, x) for y in ys for x in xs]
    for i in range(0, len(origins), batch):
        chunk = origins[i : i + batch]
        tiles = np.stack([padded[y : y + th, x : x + tw] for y, x in chunk])[:, None].astype(np.float32)
        probs = np.asarray(forward(tiles))
        if probs.shape != tiles.shape:
            raise DataError(f"forward returned shape {probs.shape} for a batch of shape {tiles.shape}")
        for (y, x), p in zip(chunk, probs):
            total[y : y + th, x : x + tw] += window * p[0]
            norm[y : y + th, x : x + tw] += window
    out = total[top : top + h, left : left + w] / norm[top : top + h, left : left + w]
    return out.astype(np.float32)[None]


def predict_tiled(forward, image, tile=256, overlap=64, batch=4, tta=False):
    """Cell probability of one slice, float32 1xHxW, by overlap-tile inference.

    image:   float32 1xHxW (images.preprocess output), H and W at least 16.
    forward: float32 Nx1xhxw -> probabilities Nx1xhxw (numpy), e.g. sigmoid(model(x)).
    tile:    side of the square tiles, a multiple of 16; 0 or None: the whole image in one pass,
             mirrored up to a multiple of 16 on the bottom and right and cropped back.
    overlap: pixels shared by neighbouring tiles (rounded up so the step is a multiple of 16); the
             image is mirrored by about half of it on every side. Tiles are blended by `ramp`.
             Ignored when tile is 0.
    batch:   tiles per forward call.
    tta:     average over the 8 flips/rotations of the square (images.dihedral), each mapped
             back before averaging; a 90-degree turn of a non-square image swaps H and W, which
             tiling handles like any other size.
    """
    tile = tile or 0
    check_tiling(tile, overlap, batch)
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[0] != 1:
        raise DataError(f"image must be 1xHxW; got shape {image.shape}")
    if min(image.shape[1:]) < POOL:
        raise DataError(
            f"image {image.shape[2]}x{image.shape[1]} is smaller than {POOL} px; mirroring would invent most of it"
        )
    if not tta:
        return predict_once(forward, image, tile, overlap, batch)
    total = np.zeros(image.shape)
    for k in range(8):
        total += inverse_dihedral(predict_once(forward, dihedral(image, k), tile, overlap, batch), k)
    return (total / 8).astype(np.float32)


def write_isbi_tiff(path, probs):
    """Writes cell probabilities as one multi-page 32-bit float TIFF, the ISBI 2012 submission format.

    The challenge expects "a 32-bit TIFF 3D image, with values between 0 (100% membrane certainty)
    and 1 (100% non-membrane certainty)" (imagej.net/events/isbi-2012-segmentation-challenge): that
    is the cell probability this repo's model predicts, written as is, not inverted. probs: a
    sequence (or NxHxW array) of HxW or 1xHxW maps in [0, 1], one per test slice in order (30 for
    the challenge). The file appears complete or not at all (temporary file, then rename).
    """
    if not path.lower().endswith(STACK_EXTS):
        raise DataError(f"{path}: the ISBI submission is a TIFF; name it .tif or .tiff")
    pages = [np.asarray(p, np.float32).reshape(np.shape(p)[-2:]) for p in probs]
    if not pages:
        raise DataError(f"{path}: no slices to write")
    if any(p.shape != pages[0].shape for p in pages):
        raise DataError(f"{path}: slices differ in size: {sorted({p.shape for p in pages})}")
    for i, p in enumerate(pages):
        if not np.all((p >= -1e-6) & (p <= 1 + 1e-6)):  # also catches NaN
            raise DataError(f"{path}: slice {i} is not a probability map in [0, 1] (min {p.min()}, max {p.max()})")
    write_stack(path, [np.clip(p, 0.0, 1.0) for p in pages])  # clip: blending round-off only
