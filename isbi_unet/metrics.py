"""ISBI 2012 evaluation: pixel error and the foreground-restricted Rand and information scores.

V_rand and V_info follow the challenge (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Fiji's "Segmentation
evaluation"): the probability map is thresholded at 0.0, 0.1, ..., 1.0,
cells become 4-connected components, boundaries are thinned to 1 px, and each score is the maximum over
thresholds, each score maximised on its own. Higher is better for V_rand and V_info, lower for pixel error.
"""

import cv2
import numpy as np

THRESHOLDS = np.round(np.arange(0, 1.01, 0.1), 2)  # 0.0 ... 1.0 without 0.30000000000000004


def pixel_error(prob, label, threshold=0.5):
    """Fraction of pixels where `prob >= threshold` (predicted cell) disagrees with `label > 127`."""
    return float(np.mean((np.asarray(prob) >= threshold) != (np.asarray(label) > 127)))


def contingency(seg, gt):
    """Sparse joint distribution of proposal `seg` and ground truth `gt` (0 = boundary in both).

    Returns (p, rows, cols, s, t): the nonzero p_ij with their row (proposal) and column (ground truth)
    indices into the marginals s and t. Only pixels with gt > 0 count; a seg == 0 pixel among them is a
    segment of its own (the challenge's singleton rule), so a boundary-heavy proposal is not rewarded.
    Returns None when gt has no foreground.
    """
    seg, gt = np.asarray(seg, np.int64), np.asarray(gt, np.int64)
    if seg.shape != gt.shape:
        raise ValueError(f"seg {seg.shape} and gt {gt.shape} differ in shape")
    fg = gt > 0
    s, g = seg[fg], gt[fg]
    if s.size == 0:
        return None
    zero = s == 0
    s[zero] = s.max() + 1 + np.arange(np.count_nonzero(zero))
    # One sort of combined keys; the marginals then come from the (small) list of nonzero cells.
    keys, counts = np.unique(s * (g.max() + 1) + g, return_counts=True)
    p = counts / s.size
    row_ids, rows = np.unique(keys // (g.max() + 1), return_inverse=True)
    col_ids, cols = np.unique(keys % (g.max() + 1), return_inverse=True)
    return p, rows, cols, np.bincount(rows, p), np.bincount(cols, p)


def rand_and_info_scores(seg, gt):
    """(V_rand, V_info) of proposal `seg` against ground truth `gt`, both integer label images.

    V_rand = 2 sum p_ij^2 / (sum s_i^2 + sum t_j^2), the harmonic mean of Rand split and merge scores;
    V_info = 2 I(S;T) / (H(S) + H(T)), the same for the information scores. When H(S) + H(T) = 0 (one
    segment on both sides) V_info is 1. NaN for both when gt has no foreground pixel.
    """
    table = contingency(seg, gt)
    if table is None:
        return float("nan"), float("nan")
    p, rows, cols, s, t = table
    v_rand = 2 * np.sum(p**2) / (np.sum(s**2) + np.sum(t**2))
    h_s, h_t = -np.sum(s * np.log(s)), -np.sum(t * np.log(t))
    mutual = np.sum(p * np.log(p / (s[rows] * t[cols])))
    v_info = 1.0 if h_s + h_t <= 0 else 2 * mutual / (h_s + h_t)
    return float(v_rand), float(min(max(v_info, 0.0), 1.0))  # clip float round-off only


def segment(prob, threshold):
    """Cell components of `prob > threshold`, grown until 1-px boundary lines (label 0) separate them.

    Strict `>` so that threshold 1.0 leaves no cell. Components are 4-connected (as the ground truth).
    Thinning is cv2.watershed on a constant image: with no gradient it floods breadth-first from the
    components, so each boundary pixel joins the nearest component (city-block distance) and only pixels
    where two fronts meet, or unreachable ones, stay 0. Returns int32 labels, 0 = boundary.
    """
    cells = (np.asarray(prob) > threshold).astype(np.uint8)
    _, markers = cv2.connectedComponents(cells, connectivity=4, ltype=cv2.CV_32S)
    # cv2.watershed overwrites the outermost pixel frame with -1; pad so that frame is not ours.
    markers = cv2.copyMakeBorder(markers, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.watershed(np.zeros(markers.shape + (3,), np.uint8), markers)
    return np.maximum(markers[1:-1, 1:-1], 0)


def gt_segments(label):
    """Ground-truth cells (label > 127) as 4-connected components, 0 = membrane."""
    return cv2.connectedComponents((np.asarray(label) > 127).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)[1]


def score_curve(prob, label, thresholds=THRESHOLDS):
    """Array (len(thresholds), 2): V_rand and V_info of segment(prob, t) for each threshold t."""
    gt = gt_segments(label)
    return np.array([rand_and_info_scores(segment(prob, t), gt) for t in thresholds]).reshape(-1, 2)


def _best(curve, thresholds, error):
    i, j = np.argmax(curve[:, 0]), np.argmax(curve[:, 1])
    return dict(
        v_rand=float(curve[i, 0]),
        v_rand_threshold=float(thresholds[i]),
        v_info=float(curve[j, 1]),
        v_info_threshold=float(thresholds[j]),
        pixel_error=float(error),
    )


def isbi_scores(prob, label, thresholds=THRESHOLDS):
    """Best V_rand and best V_info over `thresholds` (each with its threshold) and pixel error at 0.5."""
    return _best(score_curve(prob, label, thresholds), thresholds, pixel_error(prob, label))


def mean_curve(curves):
    """Mean of per-slice score curves over the slices that have one: a label without cells has no
    Rand or information score (NaN) and is left out rather than making the stack's score NaN."""
    curves = np.asarray(curves, np.float64)
    scored = np.all(np.isfinite(curves), axis=(1, 2))
    if not scored.any():
        return np.full(curves.shape[1:], np.nan)
    return curves[scored].mean(axis=0)


def evaluate_slices(probs, labels, thresholds=THRESHOLDS):
    """Stack scores: per threshold, the mean over slices; then the best threshold for each mean.

    As in the challenge, one threshold serves the whole stack, so this is at most the mean of the
    per-slice bests. Slices whose label has no cell are left out of V_rand and V_info (mean_curve).
    Pixel error is the mean over slices at 0.5.
    """
    curves = [score_curve(prob, label, thresholds) for prob, label in zip(probs, labels)]
    errors = [pixel_error(prob, label) for prob, label in zip(probs, labels)]
    if not curves:
        raise ValueError("no slices")
    return _best(mean_curve(curves), thresholds, np.mean(errors))


def print_scores(names, probs, labels):
    """Per-slice and stack table of V_rand, V_info (each with its best threshold) and pixel error."""
    row = "{:<16}{:>8.4f}{:>6.1f}{:>8.4f}{:>6.1f}{:>13.4f}"
    print("{:<16}{:>8}{:>6}{:>8}{:>6}{:>13}".format("slice", "v_rand", "t", "v_info", "t", "pixel_error"))
    curves, errors = [], []
    for name, prob, label in zip(names, probs, labels):
        curves.append(score_curve(prob, label))
        errors.append(pixel_error(prob, label))
        r = _best(curves[-1], THRESHOLDS, errors[-1])
        print(
            row.format(name, r["v_rand"], r["v_rand_threshold"], r["v_info"], r["v_info_threshold"], r["pixel_error"])
        )
    r = _best(mean_curve(curves), THRESHOLDS, np.mean(errors))  # same as evaluate_slices, curves reused
    print(row.format("mean", r["v_rand"], r["v_rand_threshold"], r["v_info"], r["v_info_threshold"], r["pixel_error"]))
    return r
