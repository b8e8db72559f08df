"""ISBI 2012 slices as a OneFlow dataset.

`SelfDataSet` pairs `image_dir/NAME.png` with `label_dir/NAME.png`, standardises each slice to zero mean
and unit variance with `preprocess` (prediction uses the same function), binarises labels (255 = cell -> 1, 0 = membrane -> 0)
and augments as the U-Net paper does (augment.py): elastic deformation, the 8 flips/rotations of the
square, mild intensity jitter, and optional random crops; optionally it also returns the paper's
border weight map for each sample.

    python3 dataloader.py --data_path data/train     # checks the folder and prints what it found
"""
import argparse
import os
import re

import cv2
import numpy as np
import oneflow as flow

from augment import border_weight_map, elastic_deform, intensity_jitter
from errors import DataError, run_main, warn

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def natural_key(name):
    # 2.png before 10.png, as the slices are numbered.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_images(folder):
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)
    if not names:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
    return names


CHANNELS = {2: "gray+alpha", 3: "RGB", 4: "RGBA"}


def read_gray(path):
    """An 8-bit single-channel image as a uint8 HxW array; colour and 16-bit files are converted with
    one warning line, as a silently converted file is how a wrong dataset goes unnoticed."""
    if not os.path.isfile(path):  # checked here, as OpenCV would add a warning line of its own
        raise DataError(f"{path}: no such file")
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: unsupported pixel type {img.dtype}; expected 8- or 16-bit grayscale")
    kind = CHANNELS.get(img.shape[2], f"{img.shape[2]}-channel") if img.ndim == 3 else None
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[:, :, 0]
    deep = img.dtype == np.uint16
    if deep:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if kind and deep:
        warn(f"{path}: 16-bit {kind} image converted to 8-bit grayscale")
    elif kind:
        warn(f"{path}: {kind} image converted to grayscale")
    elif deep:
        warn(f"{path}: 16-bit image scaled to 8-bit")
    return img


def to_unit(img):
    """uint8 HxW -> float32 1xHxW in [0, 1]."""
    return (img.astype(np.float32) / 255.0)[None]


def standardize(x):
    """Zero mean, unit variance over the whole slice.

    Slices differ in brightness and contrast (ISBI's: mean 0.45-0.56, std 0.16-0.20), and a model fed raw
    intensities scored V_rand 0.66 on the held-out slices against 0.89 once each was matched to the
    training slices' statistics. Whole-slice statistics, also for crops and tiles, so that a crop in
    training and a tile in prediction see the same numbers as the whole slice would.
    """
    return ((x - x.mean()) / max(float(x.std()), 1e-6)).astype(np.float32)


def preprocess(img):
    """uint8 HxW -> float32 1xHxW standardised; the one transform shared by training and prediction."""
    return standardize(to_unit(img))


def binarize_label(label):
    """Label image (255 = cell, 0 = membrane) -> float32 1xHxW with 1 = cell."""
    return (label > 127).astype(np.float32)[None]


def check_binary_label(label, path):
    """Raises DataError unless `label` is 0 (membrane) / 255 (cell).

    At most 1% of pixels may lie strictly between 10 and 245: JPEG-compressed copies of the labels
    circulate, and their ringing at edges is harmless once binarised at 127.
    """
    grey = np.count_nonzero((label > 10) & (label < 245))
    if grey > 0.01 * label.size:
        raise DataError(f"{path}: not a binary label ({grey / label.size:.0%} of pixels are neither 0 nor 255; "
                        "expected 0 = membrane, 255 = cell)")


def read_label(label_path, image_shape):
    """A label as a uint8 array, checked against its image's (H, W): same size, binary."""
    label = read_gray(label_path)
    if label.shape != image_shape:
        raise DataError(f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from its image's {image_shape[1]}x{image_shape[0]}")
    check_binary_label(label, label_path)
    return label


def read_pair(image_path, label_path):
    """A training image and its label as uint8 arrays, checked: same size, binary label."""
    image = read_gray(image_path)
    return image, read_label(label_path, image.shape)


def find_pairs(image_dir, label_dir):
    """File names present in both folders; any unpaired file is an error."""
    images, labels = list_images(image_dir), list_images(label_dir)
    stem = lambda n: os.path.splitext(n)[0]
    label_by_stem = {stem(n): n for n in labels}
    image_stems = {stem(n) for n in images}
    missing = [n for n in images if stem(n) not in label_by_stem]
    if missing:
        raise DataError(f"{image_dir}: {len(missing)} image(s) without a label in {label_dir}: {', '.join(missing[:5])}")
    extra = [n for n in labels if stem(n) not in image_stems]
    if extra:
        raise DataError(f"{label_dir}: {len(extra)} label(s) without an image in {image_dir}: {', '.join(extra[:5])}")
    return [(n, label_by_stem[stem(n)]) for n in images]


def held_out_block(names, count, start, where):
    """(training names, held-out names): `count` neighbouring names from index `start` (-1 = the last
    `count`) are held out. One contiguous block, because neighbouring slices nearly repeat: a scattered
    split would score slices seen in training. `where` (the data folder) prefixes the error messages."""
    if count >= len(names):
        raise DataError(f"{where}: --val_slices {count} leaves no training slice out of {len(names)}")
    if start < -1:  # a negative index would silently count from the end and split wrongly
        raise DataError(f"{where}: --val_start must be -1 (the last block) or a slice index, got {start}")
    first = len(names) - count if start == -1 else start
    if first + count > len(names):
        raise DataError(f"{where}: --val_start {start} with --val_slices {count} runs past the last of {len(names)} slices")
    return names[:first] + names[first + count:], names[first:first + count]


def evenly_spaced(n, count):
    """Indices of `count` items spread evenly over 0..n-1 (all n if count >= n), e.g. slices for precise BN."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def dihedral(arr, k):
    """The k-th (0..7) of the 8 symmetries of the square, applied to the last two axes."""
    if k >= 4:
        arr = arr[..., ::-1]
    return np.ascontiguousarray(np.rot90(arr, k % 4, axes=(-2, -1)))


class SelfDataSet(flow.utils.data.Dataset):
    """Image/label pairs held in memory (ISBI is 30 slices of 512x512).

    names:     which file names of `image_dir` to use (default: all pairs, in natural order).
    augment:   elastic deformation (if elastic_sigma > 0), random flip/rotation, intensity jitter.
    crop_size: random square crop of this side (None or 0: whole slice).
    samples_per_slice: items drawn from each slice per epoch, each with its own crop and augmentation.
    border_weight: w0 of the paper's weight map; > 0 makes items (image, label, weight).
    seed:      with the epoch (`set_epoch`) and the index, fixes every random draw.
    """

    def __init__(self, image_dir, label_dir, names=None, augment=False, crop_size=None, seed=0,
                 elastic_sigma=0.0, border_weight=0.0, samples_per_slice=1):
        pairs = find_pairs(image_dir, label_dir)
        if names is not None:
            pairs = [p for p in pairs if p[0] in set(names)]
        self.names = [p[0] for p in pairs]
        self.augment, self.crop_size = augment, crop_size or None
        self.raw, self.images, self.labels = [], [], []  # raw: [0, 1], what augmentation starts from
        for image_name, label_name in pairs:
            image_path, label_path = os.path.join(image_dir, image_name), os.path.join(label_dir, label_name)
            image, label = read_pair(image_path, label_path)
            if self.crop_size and min(image.shape) < self.crop_size:
                raise DataError(f"{image_path}: {image.shape[1]}x{image.shape[0]} is smaller than --crop_size {self.crop_size}")
            self.raw.append(to_unit(image))
            self.images.append(standardize(self.raw[-1]))
            self.labels.append(binarize_label(label))
        self.elastic_sigma = elastic_sigma
        # Computed once per slice and deformed with it (recomputing per sample costs ~50 ms).
        self.weights = [border_weight_map(l, w0=border_weight) for l in self.labels] if border_weight > 0 else None
        self.seed, self.epoch = seed, 0
        self.samples_per_slice = samples_per_slice

    def set_epoch(self, epoch):
        # Augmentation depends only on (seed, epoch, index), not on what was drawn before: a resumed run
        # draws the same crops and flips as an uninterrupted one, with no generator state to save, and
        # DataLoader workers (each holding a copy of this object) do not repeat each other's draws.
        self.epoch = epoch

    def __len__(self):
        return len(self.images) * self.samples_per_slice

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        index %= len(self.images)
        arrays = [self.raw[index] if self.augment else self.images[index], self.labels[index]]
        if self.weights is not None:
            arrays.append(self.weights[index])
        if self.augment:
            if self.elastic_sigma > 0:
                # The whole slice, then the crop: deforming a crop would pull mirrored content into its edges.
                image, label, *weight = arrays
                arrays = list(elastic_deform(image, label, rng, sigma=self.elastic_sigma, weight=weight[0] if weight else None))
            # Standardising undoes the jitter's brightness and contrast but not its gamma or clipping.
            arrays[0] = standardize(intensity_jitter(arrays[0], rng))
        if self.crop_size:
            h, w = arrays[0].shape[-2:]
            y = rng.integers(0, h - self.crop_size + 1)
            x = rng.integers(0, w - self.crop_size + 1)
            arrays = [a[:, y:y + self.crop_size, x:x + self.crop_size] for a in arrays]
        if self.augment:
            k = int(rng.integers(8))
            arrays = [dihedral(a, k) for a in arrays]
        return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", "--data-path", default="data/train", help="folder holding image/ and label/")
    args = parser.parse_args()
    ds = SelfDataSet(os.path.join(args.data_path, "image"), os.path.join(args.data_path, "label"))
    cell = np.mean([l.mean() for l in ds.labels])
    print(f"{args.data_path}: {len(ds)} pairs, {ds.images[0].shape[2]}x{ds.images[0].shape[1]}, cell fraction {cell:.3f}")


if __name__ == "__main__":
    run_main(main)
