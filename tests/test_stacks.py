"""The challenge's own files: multi-page TIFF stacks in (training and prediction) and out, and bad stacks."""

import os

import cv2
import numpy as np
import pytest

from conftest import assert_fails, make_slice, predict_script, run, snapshot, train_script
from isbi_unet.errors import DataError
from isbi_unet.stacks import count_pages


def write_challenge(root, n_train=6, n_test=3, size=(48, 48), seed=0):
    """train-volume.tif, train-labels.tif and test-volume.tif as the challenge ships them, tiny."""
    rng = np.random.default_rng(seed)
    pairs = [make_slice(rng, size) for _ in range(n_train)]
    os.makedirs(root, exist_ok=True)
    cv2.imwritemulti(f"{root}/train-volume.tif", [image for image, _ in pairs])
    cv2.imwritemulti(f"{root}/train-labels.tif", [label for _, label in pairs])
    cv2.imwritemulti(f"{root}/test-volume.tif", [make_slice(rng, size)[0] for _ in range(n_test)])
    return root


def pages(path):
    ok, images = cv2.imreadmulti(str(path), flags=cv2.IMREAD_UNCHANGED)
    assert ok
    return images


@pytest.fixture
def challenge(tmp_path):
    return write_challenge(str(tmp_path / "isbi"))


def test_trains_from_the_challenges_stacks_and_holds_out_the_last_pages(challenge, tmp_path):
    from isbi_unet.images import split_names

    assert split_names(challenge, 2) == (["0", "1", "2", "3"], ["4", "5"])
    out = train_script(challenge, tmp_path / "ckpt").stdout
    assert "4 training slices x 1 sample(s) per epoch, 2 validation slices" in out
    assert (tmp_path / "ckpt" / "best").is_dir()


def test_predicts_a_stack_into_pngs_by_page_and_stacks_in_page_order(challenge, data, trained, tmp_path):
    res = tmp_path / "res"
    out = predict_script(trained / "best", f"{challenge}/test-volume.tif", res).stdout
    assert "3 masks" in out
    assert sorted(os.listdir(res / "prob")) == ["0.png", "1.png", "2.png"]
    masks, probs = pages(res / "mask.tif"), pages(res / "prob.tif")
    assert len(masks) == len(probs) == len(pages(res / "submission.tif")) == 3
    for i in range(3):
        np.testing.assert_array_equal(masks[i], cv2.imread(str(res / f"{i}.png"), cv2.IMREAD_UNCHANGED))
        np.testing.assert_array_equal(probs[i], cv2.imread(str(res / "prob" / f"{i}.png"), cv2.IMREAD_UNCHANGED))
    # a folder in gives PNGs and the submission, no mask.tif / prob.tif
    predict_script(trained / "best", f"{data}/test", tmp_path / "folder")
    assert not (tmp_path / "folder" / "mask.tif").exists() and (tmp_path / "folder" / "submission.tif").exists()


def test_scores_against_a_label_stack_and_draws_it(challenge, trained, tmp_path):
    res = tmp_path / "res"
    volume, labels = f"{challenge}/train-volume.tif", f"{challenge}/train-labels.tif"
    out = predict_script(trained / "best", volume, res, "--label_path", labels).stdout
    assert out.splitlines()[-1].startswith("mean") and len(out.splitlines()) == 1 + 1 + 6 + 1
    table = run("evaluate.py", "--prob_dir", res / "prob", "--label_dir", labels).stdout
    assert table.splitlines()[-1] == out.splitlines()[-1]  # the same scores from the saved maps
    run("visualize.py", "--res_path", res, "--label_path", labels, "--n", 2)  # the stack named in run.json
    assert sorted(os.listdir(res / "overlay")) == ["0.png", "1.png", "overlay.json"]


def test_a_stack_inside_a_folder_is_never_read_as_its_first_page(data, trained, tmp_path):
    cv2.imwritemulti(f"{data}/test/volume.tif", [np.zeros((48, 48), np.uint8)] * 3)
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, f"{data}/test/volume.tif: a stack of 3 pages inside a folder", "pass the stack itself")
    assert not (tmp_path / "res").exists()


def broken(challenge, damage):
    labels = list(pages(f"{challenge}/train-labels.tif"))
    if damage == "pages":
        cv2.imwritemulti(f"{challenge}/train-labels.tif", labels[:5])
    elif damage == "size":
        labels[2] = cv2.resize(labels[2], (40, 48), interpolation=cv2.INTER_NEAREST)
        cv2.imwritemulti(f"{challenge}/train-labels.tif", labels)
    elif damage == "grey":
        labels[3] = cv2.GaussianBlur(labels[3], (9, 9), 3)
        cv2.imwritemulti(f"{challenge}/train-labels.tif", labels)
    else:
        with open(f"{challenge}/train-volume.tif", "r+b") as f:
            f.truncate(os.path.getsize(f"{challenge}/train-volume.tif") * 2 // 3)


@pytest.mark.parametrize(
    "damage,fragments",
    [
        ("pages", ["train-labels.tif: 5 pages, but", "train-volume.tif has 6"]),
        ("size", ["train-labels.tif page 2: size 40x48 differs from its image's 48x48"]),
        ("grey", ["train-labels.tif page 3: not a binary label"]),
        ("truncated", ["train-volume.tif: truncated"]),
    ],
)
def test_bad_stacks_are_one_line_and_write_nothing(challenge, tmp_path, damage, fragments):
    broken(challenge, damage)
    before = snapshot(challenge)
    assert_fails(train_script(challenge, tmp_path / "ckpt", check=False), *fragments)
    assert not (tmp_path / "ckpt").exists() and snapshot(challenge) == before


def test_16_bit_and_rgb_stacks_are_converted_with_one_warning_each(challenge, trained, tmp_path):
    volume = pages(f"{challenge}/test-volume.tif")
    cv2.imwritemulti(f"{tmp_path}/deep.tif", [p.astype(np.uint16) * 257 for p in volume])
    cv2.imwritemulti(f"{tmp_path}/rgb.tif", [cv2.cvtColor(p, cv2.COLOR_GRAY2BGR) for p in volume])
    for name, message in [("deep", "16-bit image scaled to 8-bit"), ("rgb", "RGB image converted to grayscale")]:
        proc = predict_script(trained / "best", f"{tmp_path}/{name}.tif", tmp_path / f"res_{name}")
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: {tmp_path}/{name}.tif: {message}"]  # once, not once per page
        assert len(pages(tmp_path / f"res_{name}" / "mask.tif")) == 3


def test_page_count_walks_the_page_table(tmp_path):
    path = str(tmp_path / "s.tif")
    cv2.imwritemulti(path, [np.full((20, 30), i, np.uint8) for i in range(5)])
    assert count_pages(path) == 5
    cv2.imwrite(str(tmp_path / "one.tif"), np.zeros((8, 8), np.uint8))
    assert count_pages(str(tmp_path / "one.tif")) == 1
    with open(path, "r+b") as f:  # OpenCV would read the 3 pages that survive without a word
        f.truncate(os.path.getsize(path) * 2 // 3)
    with pytest.raises(DataError, match="truncated"):
        count_pages(path)
    (tmp_path / "x.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="not a TIFF file"):
        count_pages(str(tmp_path / "x.tif"))
