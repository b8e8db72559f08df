"""isbi_unet/blocks.py with NumPy forwards: the cut never changes the answer, the geometry covers every pixel once,
the standardisation is images.preprocess's, the budget is kept. No model, no process."""

import numpy as np
import pytest

from isbi_unet.blocks import (
    HALO,
    SliceStats,
    block_side,
    exact_stats,
    padded_shape,
    plan_blocks,
    read_padded,
    read_window,
    standardise,
    streaming_stats,
    window_pixels,
)
from isbi_unet.formats import POOL
from isbi_unet.images import preprocess, to_8_bit
from isbi_unet.tiling import predict_tiled

SHAPES = [(512, 512), (100, 77), (300, 530), (16, 16), (17, 250)]


def like_a_unet(batch):
    """A forward with what makes tiling hard in the U-Net: zero padding at the edges of what it is given (3x3 box
    filters, repeated: 4 px of context per side) and the 16-px pooling grid (a 16x16 block mean, added back)."""
    x = batch[:, 0].astype(np.float64)
    for _ in range(4):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        x = sum(p[:, dy : dy + x.shape[1], dx : dx + x.shape[2]] for dy in range(3) for dx in range(3)) / 9
    n, h, w = x.shape
    pooled = x.reshape(n, h // POOL, POOL, w // POOL, POOL).mean(axis=(2, 4))
    x = x + np.repeat(np.repeat(pooled, POOL, 1), POOL, 2)
    return (1 / (1 + np.exp(-x)))[:, None].astype(np.float32)


def blockwise(forward, image, side, halo=HALO):
    """What isbi_unet/volume.py computes for `image`, block by block, in one process."""
    stats, out = exact_stats(image), np.full(image.shape, np.nan, np.float32)
    for b in plan_blocks(image.shape, side):
        window, (cy, cx) = read_window(b, image.shape, halo)
        x = standardise(read_padded(lambda ys, xs: image[ys, xs], window, image.shape), stats)
        prob = predict_tiled(forward, x, tile=0)[0]
        out[b.y0 : b.y1, b.x0 : b.x1] = prob[cy : cy + b.y1 - b.y0, cx : cx + b.x1 - b.x0]
    return out


def slice_of(shape, seed=0, dtype=np.uint8):
    top = 255 if dtype == np.uint8 else 4095  # a 12-bit camera in a 16-bit file
    return np.random.default_rng(seed).integers(0, top + 1, shape).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [16, 48, 128, 1024])
def test_blocks_give_the_whole_image_pass_exactly(shape, side):
    image = slice_of(shape)
    whole = predict_tiled(like_a_unet, preprocess(image), tile=0)[0]
    np.testing.assert_array_equal(blockwise(like_a_unet, image, side), whole)


def test_too_little_context_shows_where_blocks_meet():
    """The check above can fail: without a halo, the cores' edges lose their context."""
    image = slice_of((256, 256))
    whole = predict_tiled(like_a_unet, preprocess(image), tile=0)[0]
    assert np.abs(blockwise(like_a_unet, image, 64, halo=0) - whole).max() > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [16, 32, 112, 512])
def test_cores_cover_every_pixel_once_on_the_pooling_grid(shape, side):
    count = np.zeros(shape, int)
    hp, wp = padded_shape(shape)
    for b in plan_blocks(shape, side):
        count[b.y0 : b.y1, b.x0 : b.x1] += 1
        assert b.y0 % POOL == 0 and b.x0 % POOL == 0 and 0 < b.y1 - b.y0 <= side and 0 < b.x1 - b.x0 <= side
        (wy0, wy1, wx0, wx1), (cy, cx) = read_window(b, shape, HALO)
        assert all(v % POOL == 0 for v in (wy0, wy1, wx0, wx1)) and 0 <= wy0 < wy1 <= hp and 0 <= wx0 < wx1 <= wp
        assert (wy0 + cy, wx0 + cx) == (b.y0, b.x0) and wy1 - b.y1 <= HALO + POOL and b.y0 - wy0 <= HALO
    assert (count == 1).all()


def test_a_slice_that_fits_is_one_block():
    assert plan_blocks((512, 512), 512) == [(0, 0, 512, 0, 512)]
    assert len(plan_blocks((2048, 2048), 1680)) == 4  # two even cores per axis, not 1680 + 368


def test_padding_past_the_end_is_the_whole_passs_reflection():
    image = slice_of((37, 45))
    window, _ = read_window(plan_blocks(image.shape, 16)[-1], image.shape, HALO)
    padded = np.pad(image, ((0, 48 - 37), (0, 48 - 45)), mode="reflect")
    got = read_padded(lambda ys, xs: image[ys, xs], window, image.shape)
    np.testing.assert_array_equal(got, padded[window[0] : window[1], window[2] : window[3]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_standardising_a_window_is_images_preprocess_on_the_slice(dtype):
    image = slice_of((300, 200), dtype=dtype)
    eight = to_8_bit(image)[0] if dtype == np.uint16 else image
    stats = exact_stats(image)
    assert stats.bits == (12 if dtype == np.uint16 else 8)
    np.testing.assert_array_equal(standardise(image, stats), preprocess(eight))
    np.testing.assert_array_equal(standardise(image[40:90, 7:33], stats), preprocess(eight)[:, 40:90, 7:33])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_streaming_statistics_agree_with_the_whole_slice(dtype):
    image = slice_of((1000, 300), seed=3, dtype=dtype)
    streamed = streaming_stats(lambda ys: image[ys], image.shape, image.dtype, rows=64)
    exact = exact_stats(image)
    assert streamed.bits == exact.bits
    assert abs(streamed.mean - exact.mean) < 1e-6 and abs(streamed.std - exact.std) < 1e-6


def test_a_flat_slice_is_not_divided_by_zero():
    x = standardise(np.full((32, 32), 7, np.uint8), exact_stats(np.full((32, 32), 7, np.uint8)))
    assert np.isfinite(x).all() and (x == 0).all()
    assert standardise(np.zeros((16, 16), np.float32) + 0.5, SliceStats(0.5, 0.0, 0)).max() == 0


def test_the_block_side_keeps_the_budget():
    for budget, per in [(1e9, 580), (2e9, 2530), (3e8, 2530)]:
        side = block_side(budget, per)
        assert side % POOL == 0 and window_pixels(side) * per <= budget < window_pixels(side + POOL) * per
    assert block_side(1e6, 2530) == 0  # not even a 16-px core fits
    assert block_side(1e12, 580, (100, 77)) == 112  # never beyond what the slice needs
