"""Training augmentation and loss weights from the U-Net paper (Ronneberger et al. 2015, sec. 3 and 3.1).

    elastic_deform(image, label, rng)       smooth random deformation, identical for image, label (and weights)
    intensity_jitter(image, rng)            mild brightness / contrast / gamma changes, stays in [0, 1]
    border_weight_map(label)                eq. 2: class balance plus a large weight on thin gaps between cells

Arrays are the dataset's float32 1xHxW (image in [0, 1], label 1 = cell, 0 = membrane); `rng` is a
numpy Generator, so a seeded one gives the same result every time. numpy and OpenCV only.
"""

import cv2
import numpy as np

BORDER = cv2.BORDER_REFLECT_101  # mirror without repeating the edge pixel, like np.pad(mode="reflect")


def displacement_field(shape, rng, grid=3, sigma=10.0):
    """Per-pixel displacements, float32 HxWx2 (dx, dy) in pixels.

    `grid` x `grid` random vectors with N(0, sigma^2) components (the paper: 3x3, 10 px), upsampled
    bicubically to HxW. cv2.resize places the coarse vectors at the centres of a grid x grid split of
    the image; beyond the outer centres the field is extrapolated with replicated borders.
    """
    h, w = shape
    coarse = rng.normal(0.0, sigma, size=(grid, grid, 2)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def sample_map(field):
    """Absolute source coordinates (x + dx, y + dy) for cv2.remap, float32 HxWx2."""
    h, w = field.shape[:2]
    grid = np.empty((h, w, 2), np.float32)
    grid[..., 0] = np.arange(w, dtype=np.float32)
    grid[..., 1] = np.arange(h, dtype=np.float32)[:, None]
    return grid + field


def elastic_deform(image, label, rng, grid=3, sigma=10.0, weight=None):
    """The same random smooth deformation applied to image, label and (optionally) a weight map.

    Output pixel (x, y) takes the input at (x + dx, y + dy), so content moves by -(dx, dy). Borders
    are mirrored. The image is interpolated bilinearly, which keeps it within its input range up to
    float round-off (bicubic would overshoot [0, 1]). The label takes the nearest pixel, so it stays
    exactly 0/1 (nearest sampling under a gentle stretch can skip only 1-px-thin stretches of membrane,
    which are rare), and so does a weight map, so that every pixel keeps the weight of the label pixel
    it came from (bilinear would smear membrane weights onto cell pixels along every edge). cv2.remap
    quantises sample positions to 1/32 px; with sigma=0 every position is an integer and the output
    equals the input bit for bit.

    Deforming a precomputed weight map (the paper precomputes them) rather than recomputing it on the
    deformed label: the field stretches distances by a few percent only, while recomputing costs
    tens of ms per sample and, on a crop, loses the gaps whose second cell lies outside it.
    `python3 tools/bench_core.py --label ...` prints how far the two differ.

    Returns (image, label), or (image, label, weight) when `weight` is given; float32, each in its
    input's shape (1xHxW, or CxHxW for an image of several channels, all warped alike).
    """
    h, w = image.shape[-2:]
    if label.shape[-2:] != (h, w) or (weight is not None and weight.shape[-2:] != (h, w)):
        raise ValueError(f"image {image.shape}, label {label.shape} and weight must have the same size")
    coords = sample_map(displacement_field((h, w), rng, grid, sigma))

    def warp(arr, interpolation):
        planes = np.ascontiguousarray(arr, np.float32).reshape(-1, h, w)
        out = [cv2.remap(p, coords, None, interpolation, borderMode=BORDER) for p in planes]
        return np.stack(out).reshape(arr.shape)

    out = (warp(image, cv2.INTER_LINEAR), warp(label, cv2.INTER_NEAREST))
    return out if weight is None else out + (warp(weight, cv2.INTER_NEAREST),)


def intensity_jitter(image, rng, brightness=0.1, contrast=0.1, gamma=0.1):
    """Random gamma, then contrast about the mean, then brightness; clipped to [0, 1].

    The paper asks for robustness to "gray value variations" without saying how; these are mild
    defaults: gamma in [1 - gamma, 1 + gamma], contrast factor in [1 - contrast, 1 + contrast],
    brightness shift in [-brightness, brightness] (fractions of the full range). Zeros leave the
    image unchanged up to float round-off.
    """
    g = rng.uniform(1.0 - gamma, 1.0 + gamma)
    c = rng.uniform(1.0 - contrast, 1.0 + contrast)
    b = rng.uniform(-brightness, brightness)
    # clip first: a negative base has no real power. In float64, because NumPy's float32 power takes a
    # different code path (and different last bits) on CPUs with AVX-512, so the same seed would draw
    # different training data on different machines; float64 rounded to float32 agrees on both.
    out = np.power(np.clip(image, 0.0, 1.0).astype(np.float64), g).astype(np.float32)
    mean = out.mean()
    out = (out - mean) * c + mean + b
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def class_balance(cells, cell_fraction=None):
    """w_c of eq. 2: inverse class frequencies, scaled so that w_c averages 1 over the image.

    That is sklearn's "balanced" rule, n / (2 * n_class): with ISBI's ~78 % cell pixels, cells get
    about 0.64 and membrane about 2.3, and the loss keeps the scale of the unweighted one. Pass a
    dataset-wide `cell_fraction` to use the same two weights on every slice. With one class only
    (no cell, or no membrane) w_c is 1 everywhere.
    """
    f = float(cells.mean()) if cell_fraction is None else float(cell_fraction)
    if not 0.0 < f < 1.0:
        return np.ones(cells.shape, np.float32)
    return np.where(cells, 0.5 / f, 0.5 / (1.0 - f)).astype(np.float32)


def two_nearest_cell_distances(cells, cutoff):
    """d1, d2: Euclidean distances (pixel centre to pixel centre) to the nearest and second-nearest cell.

    Cells are 4-connected components, as in the ISBI evaluation (metrics.py): two cells that touch
    only diagonally across a membrane line are two cells, and 8-connectivity would merge them. Each
    cell's distance transform is computed only within `cutoff` px of its bounding box, so the cost
    grows with the image area, not with area x cells; farther distances are left at infinity.
    """
    n, ids, stats, _ = cv2.connectedComponentsWithStats(cells.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    h, w = cells.shape
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    r = int(np.ceil(cutoff))
    for k in range(1, n):
        x, y, bw, bh = stats[k, :4]
        y0, y1, x0, x1 = max(y - r, 0), min(y + bh + r, h), max(x - r, 0), min(x + bw + r, w)
        outside = (ids[y0:y1, x0:x1] != k).astype(np.uint8)  # distanceTransform measures to the nearest 0
        d = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # Exact distances are square roots of integers; OpenCV's can differ by 1 ulp from call to call
        # (SIMD vs scalar paths), so snap them for results that repeat bit for bit.
        d = np.sqrt(np.rint(d * d))
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]  # views: updated in place
        np.minimum(b, np.maximum(a, d), out=b)
        np.minimum(a, d, out=a)
    return d1, d2


def border_weight_map(label, w0=10.0, sigma=5.0, cell_fraction=None):
    """Eq. 2 of the paper: w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)), float32, same shape as `label`.

    label: 1 (or > 0.5) = cell, 0 = membrane, shape HxW or 1xHxW. d1, d2 as in
    two_nearest_cell_distances: a membrane pixel in a straight gap of g px between two cells has
    d1 + d2 = g + 1 (a 2-px gap: w_c + w0 * exp(-9 / 50)). The border term is added on membrane
    pixels only: it exists to make the net learn the thin separations between touching cells, and
    inside a cell d1 = 0 would spread it into every cell's rim (the paper's Fig. 3d shows it on the
    gaps). With fewer than two cells d2 is undefined and there is no border term. Distances beyond
    6 sigma are not computed; the term there is below w0 * exp(-18), 1.5e-7 for w0 = 10.
    """
    label = np.asarray(label)
    cells = label.reshape(label.shape[-2:]) > 0.5
    weight = class_balance(cells, cell_fraction)
    d1, d2 = two_nearest_cell_distances(cells, cutoff=6.0 * sigma)
    gap = ~cells & np.isfinite(d2)
    d = d1[gap].astype(np.float64) + d2[gap]
    weight[gap] += w0 * np.exp(-(d**2) / (2.0 * sigma**2))
    return weight.reshape(label.shape)
