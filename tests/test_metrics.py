"""isbi_unet.metrics and evaluate.py: every expected score below is worked out by hand from the definitions."""

import math

import cv2
import numpy as np
import pytest

from conftest import assert_fails, run
from isbi_unet.metrics import contingency, evaluate_slices, isbi_scores, pixel_error, rand_and_info_scores, segment


def grid_label():
    """9x9 label: four 4x4 cells separated by a 1-px membrane cross (row 4 and column 4)."""
    label = np.full((9, 9), 255, np.uint8)
    label[4, :] = 0
    label[:, 4] = 0
    return label


def test_identical_segmentations_score_one():
    label = grid_label()
    gt = cv2.connectedComponents((label > 127).astype(np.uint8), connectivity=4)[1]
    assert rand_and_info_scores(gt, gt) == pytest.approx((1.0, 1.0))
    assert rand_and_info_scores(segment(label / 255.0, 0.5), gt) == pytest.approx((1.0, 1.0))


def test_merged_pair():
    # Two gt cells of 2 px, one proposal segment: sum p^2 = 1/2, sum t^2 = 1/2, sum s^2 = 1 -> 2/3.
    # H(S) = 0 so I = 0 -> V_info = 0.
    gt = np.array([[1, 1, 0, 2, 2]])
    seg = np.ones_like(gt)
    assert rand_and_info_scores(seg, gt) == pytest.approx((2 / 3, 0.0))


def test_split_is_symmetric_to_merge():
    gt = np.array([[1, 1, 1, 1]])
    seg = np.array([[1, 1, 2, 2]])
    assert rand_and_info_scores(seg, gt) == pytest.approx((2 / 3, 0.0))
    assert rand_and_info_scores(gt, seg) == pytest.approx((2 / 3, 0.0))


def test_proposal_boundary_inside_gt_cells_counts_as_singletons():
    # gt cell A = 3 px, cell B = 2 px (n = 5). In A the proposal has segment 1 (1 px) and two seg == 0
    # pixels, which are two 1-px segments, not one 2-px segment. Column 3 is gt membrane: dropped.
    gt = np.array([[1, 1, 1, 0, 2, 2]])
    seg = np.array([[1, 0, 0, 0, 2, 2]])
    p, rows, cols, s, t = contingency(seg, gt)
    assert np.sum(s**2) == pytest.approx((1 + 1 + 1 + 4) / 25)  # a single 0-segment would give 9/25
    assert np.sum(p**2) == pytest.approx(7 / 25)
    assert np.sum(t**2) == pytest.approx((9 + 4) / 25)
    h_t = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    h_s = 3 * 0.2 * math.log(5) + 0.4 * math.log(2.5)
    # S refines T, so I(S;T) = H(T).
    assert rand_and_info_scores(seg, gt) == pytest.approx((2 * 7 / 20, 2 * h_t / (h_s + h_t)))


def test_gt_membrane_pixels_are_ignored():
    rng = np.random.default_rng(0)
    label = grid_label()
    gt = cv2.connectedComponents((label > 127).astype(np.uint8), connectivity=4)[1]
    seg = rng.integers(0, 3, gt.shape)
    before = rand_and_info_scores(seg, gt)
    seg[gt == 0] = rng.integers(0, 50, np.count_nonzero(gt == 0))
    assert rand_and_info_scores(seg, gt) == pytest.approx(before)
    assert before[0] < 1


def test_pixel_error():
    prob = np.array([[0.2, 0.5], [0.9, 0.4]])
    label = np.array([[0, 0], [255, 255]], np.uint8)
    # Predicted cell (>= 0.5): F T T F; truth: F F T T -> 2 of 4 wrong.
    assert pixel_error(prob, label) == 0.5
    assert pixel_error(prob, label, threshold=0.3) == 0.25


def test_segment_thins_a_wide_membrane_to_one_pixel():
    prob = np.ones((7, 20))
    prob[:, 7:12] = 0.2  # 5-px membrane
    seg = segment(prob, 0.5)
    boundary = np.zeros(seg.shape, bool)
    boundary[:, 9] = True
    assert np.array_equal(seg == 0, boundary)  # 1 px, in the middle, and nothing else unlabeled
    assert len(np.unique(seg[:, :9])) == 1 and len(np.unique(seg[:, 10:])) == 1
    assert seg[0, 0] != seg[0, -1]


def test_segment_threshold_is_strict():
    prob = np.full((4, 4), 0.5)
    assert segment(prob, 0.5).max() == 0
    assert (segment(prob, 0.4) > 0).all()
    assert segment(np.ones((4, 4)), 1.0).max() == 0


def test_isbi_scores_perfect_and_all_cell():
    label = grid_label()
    assert isbi_scores(label / 255.0, label) == pytest.approx(
        dict(v_rand=1.0, v_rand_threshold=0.0, v_info=1.0, v_info_threshold=0.0, pixel_error=0.0)
    )
    # All cell: one segment over four equal cells -> V_rand = 2 (1/4) / (1 + 1/4) = 0.4 for t < 1.
    r = isbi_scores(np.ones((9, 9)), label)
    assert r["v_rand"] == pytest.approx(0.4)
    assert r["pixel_error"] == pytest.approx(17 / 81)


def test_stack_threshold_is_shared_by_all_slices():
    label = grid_label()
    cell = label > 127
    low = np.where(cell, 0.35, 0.0)  # perfect for t <= 0.3, no cell (64 singletons) above
    high = np.where(cell, 1.0, 0.65)  # all cell for t <= 0.6, perfect for 0.7 ... 0.9
    # V_rand per slice: perfect 1, all cell 0.4, singletons 2/17. Mean is best at t = 0.0: (1 + 0.4) / 2.
    # V_info per slice: perfect 1, all cell 0, singletons 2 log 4 / (log 64 + log 4) = 0.5.
    r = evaluate_slices([low, high], [label, label])
    assert r == pytest.approx(
        dict(v_rand=0.7, v_rand_threshold=0.0, v_info=0.75, v_info_threshold=0.7, pixel_error=(64 / 81 + 17 / 81) / 2)
    )


def test_cli_prints_per_slice_and_mean(tmp_path):
    label = grid_label()
    for sub in ("prob", "label"):
        (tmp_path / sub).mkdir()
    cv2.imwrite(str(tmp_path / "prob" / "0.png"), label)
    cv2.imwrite(str(tmp_path / "prob" / "1.png"), np.full_like(label, 255))
    for name in ("0.png", "1.png"):
        cv2.imwrite(str(tmp_path / "label" / name), label)
    proc = run("evaluate.py", "--prob_dir", tmp_path / "prob", "--label_dir", tmp_path / "label")
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["slice", "0.png", "1.png", "mean"]
    # Mean curve: V_rand (1 + 0.4) / 2 at t = 0, V_info (1 + 0) / 2 at t = 0, pixel error 17/81 / 2.
    assert lines[-1].split() == ["mean", "0.7000", "0.0", "0.5000", "0.0", f"{17 / 162:.4f}"]


def test_cli_missing_folder(tmp_path):
    (tmp_path / "label").mkdir()
    proc = run("evaluate.py", "--prob_dir", tmp_path / "nowhere", "--label_dir", tmp_path / "label", check=False)
    assert_fails(proc, tmp_path / "nowhere")
    assert proc.stdout == ""


def test_cli_scores_the_mean_of_several_prob_dirs(tmp_path):
    label = grid_label()
    cell = label > 127
    (tmp_path / "label").mkdir()
    cv2.imwrite(str(tmp_path / "label" / "0.png"), label)
    # "a" is 170 everywhere (no cell boundary at any threshold), "b" 100 on cells and 0 on membranes (perfect
    # for t <= 0.3). Their mean, 135 on cells and 85 on membranes, is perfect for t = 0.4 and 0.5 only.
    for name, on_cells, on_membranes in (("a", 170, 170), ("b", 100, 0)):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "0.png"), np.where(cell, on_cells, on_membranes).astype(np.uint8))
    last = (
        lambda *dirs: run("evaluate.py", "--prob_dir", *[tmp_path / d for d in dirs], "--label_dir", tmp_path / "label")
        .stdout.strip()
        .splitlines()[-1]
        .split()
    )
    assert last("a")[1:3] == ["0.4000", "0.0"] and last("b")[1:3] == ["1.0000", "0.0"]
    assert last("a", "b")[:5] == ["mean", "1.0000", "0.4", "1.0000", "0.4"]

    (tmp_path / "c").mkdir()
    cv2.imwrite(str(tmp_path / "c" / "1.png"), label)
    proc = run(
        "evaluate.py", "--prob_dir", tmp_path / "a", tmp_path / "c", "--label_dir", tmp_path / "label", check=False
    )
    assert_fails(proc, tmp_path / "c" / "0.png", "missing")
