"""augment.py: expected values are worked out by hand in the comments."""

import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from numpy.core._multiarray_umath import __cpu_features__

from conftest import REPO, make_slice
from isbi_unet.augment import (
    border_weight_map,
    class_balance,
    displacement_field,
    elastic_deform,
    intensity_jitter,
    two_nearest_cell_distances,
)


def sample(size=(64, 80), seed=0):
    """Float32 1xHxW image, 0/1 label and a positive weight map, as the dataset would hold them."""
    image, label = make_slice(np.random.default_rng(seed), size)
    label = (label > 127).astype(np.float32)[None]
    return (image / 255.0).astype(np.float32)[None], label, 1.0 + label * 2.0


# --- elastic_deform -------------------------------------------------------------------------------


def test_sigma_zero_is_exactly_the_identity():
    # Every sample position is an integer, so bilinear and nearest both return the input bit for bit.
    image, label, weight = sample()
    out = elastic_deform(image, label, np.random.default_rng(1), sigma=0.0, weight=weight)
    for before, after in zip((image, label, weight), out):
        assert after.dtype == np.float32 and after.shape == before.shape
        np.testing.assert_array_equal(after, before)


def test_one_cell_grid_is_a_translation_by_the_drawn_vector():
    # grid=1: one vector (dx, dy) for every pixel, the first two normals the rng draws. On the ramp
    # image x + 2y, bilinear sampling at (x + dx, y + dy) is exact up to cv2.remap's 1/32-px steps.
    h, w, seed, sigma = 40, 60, 3, 3.0
    dx, dy = np.random.default_rng(seed).normal(0.0, sigma, 2)
    assert min(abs(dx), abs(dy)) > 0.5  # a real shift, or this test could not fail
    y, x = np.mgrid[:h, :w].astype(np.float32)
    image = ((x + 2 * y) / 200.0)[None]
    label = (x % 8 < 4).astype(np.float32)[None]  # vertical stripes, 4 px wide
    out_image, out_label = elastic_deform(image, label, np.random.default_rng(seed), grid=1, sigma=sigma)
    inside = (x + dx >= 0) & (x + dx <= w - 1) & (y + dy >= 0) & (y + dy <= h - 1)
    assert inside.mean() > 0.5
    expected = ((x + dx) + 2 * (y + dy)) / 200.0
    np.testing.assert_allclose(out_image[0][inside], expected[inside], atol=3 / 200 / 32)
    # Nearest neighbour: the stripe at the rounded source column (dx's fraction is not near 0.5).
    assert abs(dx % 1 - 0.5) > 0.1
    src = np.rint(x + dx).astype(int) % 8 < 4
    np.testing.assert_array_equal(out_label[0][inside], src[inside])


def test_label_stays_binary_and_aligned_with_the_image():
    image, label, weight = sample((256, 256))
    image = 0.2 + 0.6 * label  # image and label say the same thing, so misalignment shows
    out_image, out_label, out_weight = elastic_deform(image, label, np.random.default_rng(5), weight=weight)
    assert set(np.unique(out_label)) <= {0.0, 1.0}
    assert set(np.unique(out_weight)) <= {1.0, 3.0}  # nearest neighbour: weights of real pixels only
    np.testing.assert_array_equal(out_weight, 1.0 + 2.0 * out_label)  # each pixel keeps its own weight
    assert np.mean(out_label != label) > 0.01  # the slice really moved
    assert np.mean((out_image > 0.5) != (out_label > 0.5)) < 0.01  # but image and label moved together
    assert 0.2 - 1e-6 <= out_image.min() and out_image.max() <= 0.8 + 1e-6  # bilinear: no overshoot


def test_same_seed_same_result_other_seed_other_result():
    image, label, _ = sample()
    a = elastic_deform(image, label, np.random.default_rng(7))
    b = elastic_deform(image, label, np.random.default_rng(7))
    c = elastic_deform(image, label, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_a_multichannel_image_has_every_channel_warped_like_a_single_one():
    image, label, _ = sample()
    stacked = np.concatenate([image, 1.0 - image, image * 0.5])
    out_image, out_label = elastic_deform(stacked, label, np.random.default_rng(3))
    single, single_label = elastic_deform(image, label, np.random.default_rng(3))
    assert out_image.shape == stacked.shape
    np.testing.assert_array_equal(out_image[0], single[0])
    np.testing.assert_allclose(out_image[1], 1.0 - single[0], atol=1e-6)
    np.testing.assert_allclose(out_image[2], single[0] * 0.5, atol=1e-6)
    np.testing.assert_array_equal(out_label, single_label)


def test_displacements_have_the_requested_spread_and_are_smooth():
    rng = np.random.default_rng(0)
    # Resizing 3x3 to 3x3 returns the drawn vectors themselves: N(0, 10^2) components.
    nodes = np.stack([displacement_field((3, 3), rng, grid=3, sigma=10.0) for _ in range(2000)])
    assert nodes.std() == pytest.approx(10.0, rel=0.02) and abs(nodes.mean()) < 0.2
    field = displacement_field((512, 512), rng, grid=3, sigma=10.0)
    assert field.shape == (512, 512, 2) and field.dtype == np.float32
    assert np.abs(np.diff(field, axis=0)).max() < 1.0 and np.abs(np.diff(field, axis=1)).max() < 1.0


def test_mismatched_sizes_are_refused():
    image, label, _ = sample()
    with pytest.raises(ValueError, match="same size"):
        elastic_deform(image, label[:, :10], np.random.default_rng(0))


# --- intensity_jitter -----------------------------------------------------------------------------


def test_jitter_stays_in_unit_range_and_is_mild():
    image = np.random.default_rng(0).random((1, 64, 64), dtype=np.float32)
    for seed in range(20):
        out = intensity_jitter(image, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == image.shape
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.abs(out - image).mean() < 0.15
    np.testing.assert_array_equal(
        intensity_jitter(image, np.random.default_rng(3)), intensity_jitter(image, np.random.default_rng(3))
    )
    np.testing.assert_allclose(intensity_jitter(image, np.random.default_rng(3), 0, 0, 0), image, atol=1e-6)


def test_brightness_alone_adds_one_constant():
    image = np.linspace(0.2, 0.8, 100, dtype=np.float32).reshape(1, 10, 10)  # far from clipping
    shift = intensity_jitter(image, np.random.default_rng(4), brightness=0.1, contrast=0, gamma=0) - image
    np.testing.assert_allclose(shift, shift.flat[0], atol=1e-6)
    assert 0.0 < abs(shift.flat[0]) <= 0.1


def test_contrast_alone_scales_about_the_mean():
    image = np.linspace(0.2, 0.8, 100, dtype=np.float32).reshape(1, 10, 10)
    out = intensity_jitter(image, np.random.default_rng(4), brightness=0, contrast=0.1, gamma=0)
    factor = (out - image.mean()) / (image - image.mean())
    assert out.mean() == pytest.approx(image.mean(), abs=1e-6)
    np.testing.assert_allclose(factor, factor.flat[0], rtol=1e-4)
    assert 0.9 <= factor.flat[0] <= 1.1 and factor.flat[0] != pytest.approx(1.0, abs=1e-4)


def test_gamma_alone_is_a_power():
    image = np.linspace(0.2, 0.8, 100, dtype=np.float32).reshape(1, 10, 10)
    out = intensity_jitter(image, np.random.default_rng(4), brightness=0, contrast=0, gamma=0.1)
    g = math.log(out.flat[0]) / math.log(image.flat[0])
    assert 0.9 <= g <= 1.1 and g != pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(out, image**g, rtol=1e-5)


AVX512 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"


def jitter_bytes(env_extra):
    """intensity_jitter of a fixed image in a fresh process, with NumPy's CPU dispatch set by env_extra."""
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from isbi_unet.augment import intensity_jitter; "
        "x = np.random.default_rng(0).random((1, 128, 128), dtype=np.float32); "
        "sys.stdout.buffer.write(b''.join(intensity_jitter(x, np.random.default_rng(s)).tobytes() for s in range(4)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
    proc = subprocess.run([sys.executable, "-c", code, REPO], env={**env, **env_extra}, capture_output=True, check=True)
    return proc.stdout


@pytest.mark.skipif(not __cpu_features__.get("AVX512F"), reason="needs a CPU with AVX-512 to compare it against AVX2")
def test_jitter_is_bit_identical_without_avx512():
    # NumPy's float32 power has AVX-512 code whose last bits differ from its AVX2 path (they did before float64).
    assert jitter_bytes({"NPY_DISABLE_CPU_FEATURES": AVX512}) == jitter_bytes({})


# --- border_weight_map ----------------------------------------------------------------------------


def two_rectangles():
    """40x40: cells A (rows 10-29, cols 5-18) and B (rows 10-29, cols 21-34), a 2-px gap at cols 19-20.

    Cell fraction 2 * 20 * 14 / 1600 = 0.35, so w_c = 0.5 / 0.35 = 1.428571 on cells and
    0.5 / 0.65 = 0.769231 on membrane. A gap pixel is 1 px from one rectangle's edge pixel and 2 px
    from the other's: d1 + d2 = 3, w = 0.769231 + 10 * exp(-9 / 50) = 0.769231 + 8.352702 = 9.121933.
    """
    label = np.zeros((1, 40, 40), np.float32)
    label[0, 10:30, 5:19] = 1
    label[0, 10:30, 21:35] = 1
    return label


def test_weight_peaks_in_the_gap_between_two_cells():
    weight = border_weight_map(two_rectangles(), w0=10.0, sigma=5.0)
    assert weight.shape == (1, 40, 40) and weight.dtype == np.float32
    assert weight.max() == pytest.approx(0.769231 + 8.352702, abs=1e-5)
    np.testing.assert_allclose(weight[0, 10:30, 19:21], 9.121933, atol=1e-5)  # the whole gap
    peak_cols = np.unique(np.argwhere(weight[0] > 9.12)[:, 1])
    assert list(peak_cols) == [19, 20]


def test_weight_is_class_balance_away_from_gaps():
    weight = border_weight_map(two_rectangles())[0]
    np.testing.assert_allclose(weight[20, 10], 1 / 0.7, rtol=1e-6)  # inside A: no border term in cells
    np.testing.assert_allclose(weight[25:30, 23:30], 1 / 0.7, rtol=1e-6)
    # Corner (0, 0): d1 = |(0,0)-(10,5)| = 11.18, d2 = |(0,0)-(10,21)| = 23.26; 10 exp(-34.4^2/50) ~ 5e-10.
    assert weight[0, 0] == pytest.approx(0.5 / 0.65, abs=1e-6)
    # Above A, (5, 12): d1 = 5, d2 = |(5,12)-(10,21)| = 10.30 -> 0.769 + 10 exp(-15.30^2 / 50) = 0.862.
    assert weight[5, 12] == pytest.approx(0.5 / 0.65 + 10 * math.exp(-((5 + math.hypot(5, 9)) ** 2) / 50), abs=1e-5)


def test_no_cell_and_one_cell_give_class_balance_only():
    np.testing.assert_array_equal(border_weight_map(np.zeros((1, 20, 30), np.float32)), 1.0)
    np.testing.assert_array_equal(border_weight_map(np.ones((1, 20, 30), np.float32)), 1.0)
    one = np.zeros((20, 30), np.float32)  # HxW works too
    one[5:15, 5:20] = 1  # f = 150 / 600 = 0.25: cells 2.0, membrane 2/3
    weight = border_weight_map(one)
    assert weight.shape == (20, 30)
    np.testing.assert_allclose(weight, np.where(one > 0, 2.0, 2 / 3), rtol=1e-6)


def test_cells_touching_at_a_corner_are_two_cells():
    # 4-connectivity: (0-4, 0-4) and (5-9, 5-9) touch only diagonally. Membrane pixel (4, 5) is 1 px
    # from (4, 4) and 1 px from (5, 5): d1 + d2 = 2, border term 10 exp(-4/50) = 9.231163.
    # 8-connectivity would make one cell and no border term.
    label = np.zeros((10, 10), np.float32)
    label[:5, :5] = 1
    label[5:, 5:] = 1  # f = 0.5: w_c = 1 for both classes
    weight = border_weight_map(label)
    assert weight[4, 5] == pytest.approx(1 + 10 * math.exp(-4 / 50), abs=1e-5)
    assert weight[5, 4] == pytest.approx(1 + 10 * math.exp(-4 / 50), abs=1e-5)


def test_class_balance_averages_one_and_can_use_a_dataset_fraction():
    cells = np.random.default_rng(0).random((50, 50)) < 0.8
    assert class_balance(cells).mean() == pytest.approx(1.0, abs=1e-6)
    fixed = class_balance(cells, cell_fraction=0.5)
    np.testing.assert_array_equal(fixed, 1.0)


def test_two_nearest_distances_match_brute_force():
    cells = np.ones((40, 40), np.uint8)
    for p, q in (((0, 12), (39, 12)), ((20, 0), (20, 39)), ((0, 0), (39, 30)), ((0, 35), (25, 39))):
        cv2.line(cells, p, q, 0, 2)  # straight and slanted membranes, cells of several shapes
    cells = cells > 0
    n, ids = cv2.connectedComponents(cells.astype(np.uint8), connectivity=4)
    assert n - 1 >= 3
    y, x = np.mgrid[:40, :40]
    dist = []
    for k in range(1, n):
        py, px = np.nonzero(ids == k)
        dist.append(np.sqrt(((y[..., None] - py) ** 2 + (x[..., None] - px) ** 2).min(-1)))
    dist = np.sort(dist, axis=0)
    d1, d2 = two_nearest_cell_distances(cells, cutoff=1000)
    np.testing.assert_allclose(d1, dist[0], atol=1e-5)
    np.testing.assert_allclose(d2, dist[1], atol=1e-5)
    # With a cutoff, distances up to it are exact and the rest are left at infinity.
    d1, d2 = two_nearest_cell_distances(cells, cutoff=5)
    near = dist[1] <= 5
    np.testing.assert_allclose(d2[near], dist[1][near], atol=1e-5)
    assert np.all(d2[dist[1] > 5 + 5 * 2**0.5] == np.inf)
