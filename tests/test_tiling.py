"""tiling.py with hand-made forwards in numpy: no model needed."""

import os

import cv2
import numpy as np
import pytest

from isbi_unet.images import dihedral, inverse_dihedral
from isbi_unet.tiling import axis_plan, predict_tiled, ramp, write_isbi_tiff


def box_sigmoid(batch):
    """3x3 mean with mirrored borders, then sigmoid: translation- and flip/rotation-equivariant."""
    p = np.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    h, w = batch.shape[-2:]
    s = sum(p[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return (1.0 / (1.0 + np.exp(-8.0 * (s - 0.5)))).astype(np.float32)


def identity(batch):
    return batch


def image_of(h, w, seed=0):
    return np.random.default_rng(seed).random((1, h, w), dtype=np.float32)


# (tile, overlap, H, W): smaller than a tile, non-square, not multiples of 16, many tiles, odd overlaps.
CASES = [
    (64, 16, 37, 45),
    (256, 64, 600, 520),
    (32, 16, 37, 45),
    (64, 24, 100, 17),
    (256, 64, 512, 512),
    (128, 32, 16, 300),
    (48, 0, 96, 50),
    (64, 40, 130, 129),
    (0, 0, 37, 45),
    (None, 0, 600, 520),
]


@pytest.mark.parametrize("tile,overlap,h,w", CASES)
def test_identity_forward_gives_the_image_back_exactly(tile, overlap, h, w):
    image = image_of(h, w)
    out = predict_tiled(identity, image, tile=tile, overlap=overlap, batch=3)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, image)  # also proves every pixel is covered (else 0/0 = NaN)


@pytest.mark.parametrize("tile,overlap,h,w", CASES)
def test_constant_forward_gives_the_constant_everywhere(tile, overlap, h, w):
    out = predict_tiled(lambda b: np.full_like(b, 0.3), image_of(h, w), tile=tile, overlap=overlap)
    np.testing.assert_array_equal(out, np.float32(0.3))


@pytest.mark.parametrize("tile,overlap,h,w", [c for c in CASES if c[1] >= 4])
def test_tiles_agree_with_one_whole_image_pass_when_overlap_covers_the_receptive_field(tile, overlap, h, w):
    # The box filter sees 1 px around each pixel; the ramp drops overlap/4 >= 1 px at tile edges, where a
    # tile's own mirroring would differ from the real neighbours, so the blend is exact up to round-off.
    image = image_of(h, w)
    np.testing.assert_allclose(
        predict_tiled(box_sigmoid, image, tile=tile, overlap=overlap), box_sigmoid(image[None])[0], atol=1e-6
    )


def test_without_overlap_the_seams_show():
    # Control for the test above: abutting tiles filter their edges with the wrong neighbours.
    image = image_of(96, 96)
    out = predict_tiled(box_sigmoid, image, tile=48, overlap=0)
    seam = np.abs(out - box_sigmoid(image[None])[0])[0]
    assert seam[:, 47:49].max() > 0.01 and seam[10:40, 10:40].max() < 1e-6


def test_ramps_cross_fade_to_one_in_the_overlap():
    # tile 64, overlap 32: zero for the outer 8 px, 1 beyond 24 px, and tile k's right ramp plus tile
    # k+1's left ramp (shifted by the step 32) sum to 1.
    r = ramp(64, 32)
    assert np.all(r[:8] == 0) and np.all(r[24:40] == 1) and np.all(r[56:] == 0)
    np.testing.assert_allclose(r[32:] + r[:32], 1.0)
    assert r[8] == pytest.approx(0.5 / 16)
    np.testing.assert_array_equal(ramp(48, 0), 1.0)


def test_axis_plan_mirrors_margins_and_aligns_tiles_to_the_pooling_grid():
    # 512 px, tile 256, overlap 64: step 192, margin 32, 512 + 64 = 576 needs 3 tiles (256 + 2 * 192 = 640).
    assert axis_plan(512, 256, 64) == (32, 96, 256, [0, 192, 384], 64)
    # overlap 40 -> step 216 rounded down to 208 -> overlap 48, margin 24 rounded up to 32.
    before, after, size, starts, overlap = axis_plan(600, 256, 40)
    assert (before, size, overlap) == (32, 256, 48) and all(s % 16 == 0 for s in starts)
    assert starts[-1] + size == before + 600 + after and after >= before
    assert axis_plan(37, 0, 0) == (0, 11, 48, [0], 0)  # whole image: up to a multiple of 16
    assert axis_plan(20, 64, 16) == (16, 28, 64, [0], 16)  # smaller than a tile: one tile


def test_forward_sees_tiles_of_the_requested_size_in_batches():
    shapes = []
    predict_tiled(lambda b: shapes.append(b.shape) or b, image_of(512, 512), tile=256, overlap=64, batch=4)
    assert shapes == [(4, 1, 256, 256), (4, 1, 256, 256), (1, 1, 256, 256)]  # 3 x 3 tiles
    shapes.clear()
    predict_tiled(lambda b: shapes.append(b.shape) or b, image_of(37, 45), tile=0)
    assert shapes == [(1, 1, 48, 48)]


def test_inverse_dihedral_undoes_dihedral_on_non_square_arrays():
    a = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    for k in range(8):
        np.testing.assert_array_equal(inverse_dihedral(dihedral(a, k), k), a)


@pytest.mark.parametrize("tile,overlap,h,w", [(64, 16, 37, 45), (0, 0, 40, 72), (64, 32, 100, 70)])
def test_tta_with_identity_gives_the_image_back(tile, overlap, h, w):
    # Any orientation mapped back wrongly would mix rotated copies of the image into the average.
    image = image_of(h, w)
    np.testing.assert_array_equal(predict_tiled(identity, image, tile=tile, overlap=overlap, tta=True), image)


@pytest.mark.parametrize("tile,overlap,h,w", [(64, 16, 37, 45), (0, 0, 37, 45), (128, 32, 200, 150)])
def test_tta_changes_nothing_for_an_equivariant_forward(tile, overlap, h, w):
    image = image_of(h, w)
    plain = predict_tiled(box_sigmoid, image, tile=tile, overlap=overlap)
    np.testing.assert_allclose(
        predict_tiled(box_sigmoid, image, tile=tile, overlap=overlap, tta=True), plain, atol=1e-6
    )


def test_tta_averages_a_non_equivariant_forward_by_hand():
    # forward = u^2 with u = column / (width - 1) of whatever it is given. Whole 32x48 image (no
    # padding). Mapped back, the 8 orientations give u^2, (1-u)^2, v^2, (1-v)^2 twice each, with
    # u = x / 47 and v = y / 31 on the original image: the mean is their sum / 4.
    def squared_ramp(batch):
        w = batch.shape[-1]
        return np.broadcast_to((np.arange(w, dtype=np.float32) / (w - 1)) ** 2, batch.shape).copy()

    h, w = 32, 48
    v, u = np.mgrid[:h, :w]
    u, v = u / (w - 1), v / (h - 1)
    expected = (u**2 + (1 - u) ** 2 + v**2 + (1 - v) ** 2) / 4
    out = predict_tiled(squared_ramp, image_of(h, w), tile=0, tta=True)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    np.testing.assert_allclose(predict_tiled(squared_ramp, image_of(h, w), tile=0)[0], u**2, atol=1e-6)


@pytest.mark.parametrize(
    "tile,overlap,fragment",
    [
        (100, 16, "multiple of 16"),
        (8, 0, "multiple of 16"),
        (-16, 0, "multiple of 16"),
        (64, 56, "overlap must lie"),
        (64, -16, "overlap must lie"),
    ],
)
def test_bad_tiling_is_refused_with_a_clear_message(tile, overlap, fragment):
    with pytest.raises(ValueError, match=fragment):
        predict_tiled(identity, image_of(64, 64), tile=tile, overlap=overlap)


def test_bad_images_and_forwards_are_refused():
    with pytest.raises(ValueError, match="smaller than 16"):
        predict_tiled(identity, image_of(15, 64))
    with pytest.raises(ValueError, match="1xHxW"):
        predict_tiled(identity, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="forward returned shape"):
        predict_tiled(lambda b: b[:, :, :10], image_of(64, 64), tile=32, overlap=0)
    with pytest.raises(ValueError, match="batch"):
        predict_tiled(identity, image_of(64, 64), batch=0)


# --- write_isbi_tiff ------------------------------------------------------------------------------


def test_isbi_tiff_round_trips_as_one_float32_stack(tmp_path):
    rng = np.random.default_rng(0)
    probs = [rng.random((1, 48, 64), dtype=np.float32) for _ in range(30)]
    probs[0][0, 0, :3] = [0.0, 1.0, 0.5]
    path = str(tmp_path / "submission.tif")
    write_isbi_tiff(path, probs)
    ok, pages = cv2.imreadmulti(path, flags=cv2.IMREAD_UNCHANGED)
    assert ok and len(pages) == 30
    for page, prob in zip(pages, probs):
        assert page.dtype == np.float32 and page.shape == (48, 64)
        np.testing.assert_array_equal(page, prob[0])
    assert os.listdir(tmp_path) == ["submission.tif"]  # no temporary file left behind


def test_isbi_tiff_reads_as_32_bit_float_pages_elsewhere(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # an independent reader, when installed
    path = str(tmp_path / "s.tif")
    write_isbi_tiff(path, np.full((3, 20, 30), 0.25, np.float32))
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.mode == "F" and im.size == (30, 20)
        assert im.tag_v2[258] == (32,) and im.tag_v2[339] == (3,)  # BitsPerSample 32, SampleFormat IEEE float


def test_isbi_tiff_refuses_non_probabilities_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "s.tif")
    write_isbi_tiff(path, [np.zeros((20, 30), np.float32)])
    with pytest.raises(ValueError, match=r"slice 1 is not a probability map"):
        write_isbi_tiff(path, [np.zeros((20, 30)), np.full((20, 30), 255.0)])  # 0-255 maps are refused
    with pytest.raises(ValueError, match="not a probability map"):
        write_isbi_tiff(path, [np.full((20, 30), np.nan)])
    with pytest.raises(ValueError, match="differ in size"):
        write_isbi_tiff(path, [np.zeros((20, 30)), np.zeros((30, 20))])
    with pytest.raises(ValueError, match="name it .tif"):
        write_isbi_tiff(str(tmp_path / "s.png"), [np.zeros((20, 30))])
    ok, pages = cv2.imreadmulti(path, flags=cv2.IMREAD_UNCHANGED)
    assert ok and len(pages) == 1  # the earlier file is intact
    assert sorted(os.listdir(tmp_path)) == ["s.tif"]
