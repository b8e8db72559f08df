import os

import cv2
import numpy as np
import pytest

from conftest import write_dataset
from dataloader import SelfDataSet
from isbi_unet.errors import DataError
from isbi_unet.images import binarize_label, check_binary_label, dihedral, find_pairs, preprocess, read_gray


def test_pairs_by_name_in_natural_order(tmp_path):
    root = write_dataset(str(tmp_path), n_train=12)
    pairs = find_pairs(os.path.join(root, "train/image"), os.path.join(root, "train/label"))
    assert [p[0] for p in pairs] == [f"{i}.png" for i in range(12)]
    assert all(a == b for a, b in pairs)


def test_unpaired_image_is_an_error_naming_it(tmp_path):
    root = write_dataset(str(tmp_path), n_train=3)
    os.remove(os.path.join(root, "train/label/1.png"))
    with pytest.raises(DataError, match=r"train/image: 1 image\(s\) without a label .*1\.png"):
        find_pairs(os.path.join(root, "train/image"), os.path.join(root, "train/label"))


def test_unpaired_label_is_an_error_naming_it(tmp_path):
    root = write_dataset(str(tmp_path), n_train=3)
    os.remove(os.path.join(root, "train/image/2.png"))
    with pytest.raises(DataError, match=r"train/label: 1 label\(s\) without an image .*2\.png"):
        find_pairs(os.path.join(root, "train/image"), os.path.join(root, "train/label"))


def test_preprocess_standardises_each_slice_and_labels_binarise():
    img = np.array([[0, 51, 255]], np.uint8)
    out = preprocess(img)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    x = np.array([0.0, 0.2, 1.0])
    np.testing.assert_allclose(out[0, 0], (x - x.mean()) / x.std(), rtol=1e-5)
    # brightness and contrast changes of a slice do not reach the network
    np.testing.assert_allclose(preprocess((img * 0.5 + 40).astype(np.uint8)), out, atol=0.02)
    assert np.array_equal(preprocess(np.full((4, 4), 9, np.uint8)), np.zeros((1, 4, 4), np.float32))
    np.testing.assert_array_equal(binarize_label(np.array([[0, 255, 200, 10]], np.uint8))[0, 0], [0, 1, 1, 0])


def test_dihedral_gives_eight_distinct_transforms():
    a = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    outs = {dihedral(a, k).tobytes() for k in range(8)}
    assert len(outs) == 8
    np.testing.assert_array_equal(dihedral(a, 0), a)
    np.testing.assert_array_equal(dihedral(a, 4), a[..., ::-1])


def test_augmented_label_stays_aligned_with_image(tmp_path):
    # The label is a pixelwise function of the image here, so any misaligned flip, rotation or crop shows.
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "image")), os.makedirs(os.path.join(root, "label"))
    rng = np.random.default_rng(1)
    for i in range(3):
        image = rng.integers(0, 256, (40, 40)).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "image", f"{i}.png"), image)
        cv2.imwrite(os.path.join(root, "label", f"{i}.png"), np.where(image > 127, 255, 0).astype(np.uint8))
    ds = SelfDataSet(os.path.join(root, "image"), os.path.join(root, "label"), augment=True, crop_size=24, seed=3)
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == label.shape == (1, 24, 24)
            # intensity jitter is monotone, so every cell pixel stays at least as bright as every membrane pixel
            assert image[label == 1].min() >= image[label == 0].max()
            seen.add(image.tobytes())
    assert len(seen) > 30  # crops and flips really vary


def test_mis_sized_label_is_an_error(tmp_path):
    root = write_dataset(str(tmp_path), n_train=2)
    cv2.imwrite(os.path.join(root, "train/label/1.png"), np.zeros((20, 48), np.uint8))
    with pytest.raises(DataError, match=r"train/label/1\.png: size 48x20 differs"):
        SelfDataSet(os.path.join(root, "train/image"), os.path.join(root, "train/label"))


def test_corrupt_png_is_an_error(tmp_path):
    root = write_dataset(str(tmp_path), n_train=2)
    with open(os.path.join(root, "train/image/0.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"train/image/0\.png: not a readable image"):
        SelfDataSet(os.path.join(root, "train/image"), os.path.join(root, "train/label"))


def test_paper_augmentation_returns_weights_and_keeps_labels_binary(data):
    ds = SelfDataSet(
        f"{data}/train/image",
        f"{data}/train/label",
        augment=True,
        crop_size=32,
        seed=1,
        elastic_sigma=10.0,
        border_weight=10.0,
    )
    for i in range(len(ds)):
        image, label, weight = ds[i]
        assert image.shape == label.shape == weight.shape == (1, 32, 32)
        assert set(np.unique(label)) <= {0.0, 1.0} and np.isfinite(image).all()
        assert weight.min() > 0
        # the border term lands on membranes (label 0), where weights exceed any cell pixel's
        if (label == 0).any() and (label == 1).any():
            assert weight[label == 0].max() > weight[label == 1].max()
    plain = SelfDataSet(f"{data}/train/image", f"{data}/train/label", augment=True, seed=1)
    assert len(plain[0]) == 2
    # a whole augmented slice is standardised after its jitter, as prediction standardises a slice
    assert abs(plain[0][0].mean()) < 1e-4 and abs(plain[0][0].std() - 1) < 1e-3


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    # What makes resume exact with no dataset state saved: the draw for (seed, epoch, index) does not
    # depend on what was drawn before, in this process or another.
    root = write_dataset(str(tmp_path), n_train=4)
    make = lambda seed: SelfDataSet(
        os.path.join(root, "train/image"), os.path.join(root, "train/label"), augment=True, crop_size=16, seed=seed
    )
    a, b = make(7), make(7)
    a.set_epoch(3), b.set_epoch(3)
    for i in (2, 0, 3, 1):  # b in another order, and after unrelated draws
        b[i], b.set_epoch(1), b[i], b.set_epoch(3)
    for i in range(4):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    a.set_epoch(4)
    assert any(not np.array_equal(a[i][0], b[i][0]) for i in range(4))
    c = make(8)
    c.set_epoch(3)
    assert any(not np.array_equal(c[i][0], b[i][0]) for i in range(4))


def test_binary_label_check_tolerates_one_percent_grey():
    label = np.full((100, 100), 255, np.uint8)
    label[:50] = 0
    label[50, :100] = 128  # 1% grey, as a JPEG-compressed copy has at edges
    check_binary_label(label, "x.png")
    label[51, :1] = 128
    with pytest.raises(DataError, match=r"x\.png: not a binary label"):
        check_binary_label(label, "x.png")
    label[:] = 10  # near-black noise counts as membrane
    check_binary_label(label, "x.png")


def test_non_binary_label_is_an_error(tmp_path):
    root = write_dataset(str(tmp_path), n_train=2)
    cv2.imwrite(os.path.join(root, "train/label/1.png"), np.full((48, 48), 128, np.uint8))
    with pytest.raises(DataError, match=r"train/label/1\.png: not a binary label \(100% of pixels"):
        SelfDataSet(os.path.join(root, "train/image"), os.path.join(root, "train/label"))


@pytest.mark.parametrize(
    "convert,warning",
    [
        (lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2BGR), "RGB image converted to grayscale"),
        (lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2BGRA), "RGBA image converted to grayscale"),
        (lambda g: g.astype(np.uint16) * 257, "16-bit image scaled to 8-bit"),
        (
            lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2BGR).astype(np.uint16) * 257,
            "16-bit RGB image converted to 8-bit grayscale",
        ),
    ],
)
def test_colour_and_16_bit_files_read_as_the_8_bit_grey_original(tmp_path, capsys, convert, warning):
    grey = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, convert(grey))
    np.testing.assert_array_equal(read_gray(path), grey)
    assert capsys.readouterr().err == f"warning: {path}: {warning}\n"
    cv2.imwrite(path, grey)
    read_gray(path)
    assert capsys.readouterr().err == ""


def test_samples_per_slice_draws_distinct_crops_of_every_slice(data):
    root = f"{data}/train"
    one = SelfDataSet(f"{root}/image", f"{root}/label", augment=True, crop_size=32, seed=2)
    three = SelfDataSet(f"{root}/image", f"{root}/label", augment=True, crop_size=32, seed=2, samples_per_slice=3)
    n = len(one)
    assert len(three) == 3 * n
    assert np.array_equal(three[0][0], one[0][0])  # index i < n draws exactly what one sample per slice draws
    crops = SelfDataSet(f"{root}/image", f"{root}/label", crop_size=32, seed=2, samples_per_slice=3)
    for i in range(n):
        full = crops.images[i][0]
        found = [
            {
                (y, x)
                for y in range(full.shape[0] - 31)
                for x in range(full.shape[1] - 31)
                if np.array_equal(crops[i + k * n][0][0], full[y : y + 32, x : x + 32])
            }
            for k in range(3)
        ]
        assert all(found), f"a sample of slice {i} is not a crop of it"
        assert len(set.union(*found)) >= 2, "the three samples of a slice are the same crop"
