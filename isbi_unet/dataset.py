"""The training pairs in memory, with the U-Net paper's augmentation; NumPy and OpenCV only.

`Slices` is the whole dataset logic; `dataloader.SelfDataSet` makes it a OneFlow Dataset, and
tools/torch_reference.py uses it as it is.
"""

import numpy as np

from isbi_unet.augment import border_weight_map, elastic_deform, intensity_jitter
from isbi_unet.errors import DataError
from isbi_unet.images import binarize_label, dihedral, find_pairs, read_pair, slice_path, standardize, to_unit


class Slices:
    """Image/label pairs held in memory (ISBI is 30 slices of 512x512).

    image_dir, label_dir: folders of images with the same names, or two stacks with as many pages.
    names:     which file names of `image_dir` to use (default: all pairs, in natural order).
    augment:   elastic deformation (if elastic_sigma > 0), random flip/rotation (of the 8 symmetries of a square
               sample, the 4 that keep a non-square sample's shape), intensity jitter.
    crop_size: random square crop of this side (None or 0: whole slice).
    samples_per_slice: items drawn from each slice per epoch, each with its own crop and augmentation.
    border_weight: w0 of the paper's weight map; > 0 makes items (image, label, weight).
    seed:      with the epoch (`set_epoch`) and the index, fixes every random draw.
    """

    def __init__(
        self,
        image_dir,
        label_dir,
        names=None,
        augment=False,
        crop_size=None,
        seed=0,
        elastic_sigma=0.0,
        border_weight=0.0,
        samples_per_slice=1,
    ):
        pairs = find_pairs(image_dir, label_dir)
        if names is not None:
            pairs = [p for p in pairs if p[0] in set(names)]
        self.names = [p[0] for p in pairs]
        self.augment, self.crop_size = augment, crop_size or None
        self.raw, self.images, self.labels = [], [], []  # raw: [0, 1], what augmentation starts from
        for image_name, label_name in pairs:
            image, label = read_pair(image_dir, label_dir, image_name, label_name)
            if self.crop_size and min(image.shape) < self.crop_size:
                where, (h, w) = slice_path(image_dir, image_name), image.shape
                raise DataError(f"{where}: {w}x{h} is smaller than --crop_size {self.crop_size}")
            self.raw.append(to_unit(image))
            self.images.append(standardize(self.raw[-1]))
            self.labels.append(binarize_label(label))
        self.elastic_sigma = elastic_sigma
        # Computed once per slice and deformed with it: recomputing per sample is slow.
        self.weights = [border_weight_map(lab, w0=border_weight) for lab in self.labels] if border_weight > 0 else None
        self.seed, self.epoch = seed, 0
        self.samples_per_slice = samples_per_slice

    def set_epoch(self, epoch):
        # Draws depend only on (seed, epoch, index): a resumed run draws what an uninterrupted one would,
        # and DataLoader workers (each holding a copy of this object) do not repeat each other's draws.
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
                weight = weight[0] if weight else None
                arrays = list(elastic_deform(image, label, rng, sigma=self.elastic_sigma, weight=weight))
            # Standardising undoes the jitter's brightness and contrast but not its gamma or clipping.
            arrays[0] = standardize(intensity_jitter(arrays[0], rng))
        if self.crop_size:
            h, w = arrays[0].shape[-2:]
            y = rng.integers(0, h - self.crop_size + 1)
            x = rng.integers(0, w - self.crop_size + 1)
            arrays = [a[:, y : y + self.crop_size, x : x + self.crop_size] for a in arrays]
        if self.augment:
            k = int(rng.integers(8))
            if arrays[0].shape[-2] != arrays[0].shape[-1]:
                # A quarter turn makes HxW into WxH, which no batch of HxW samples can stack with: a non-square
                # sample takes the 4 symmetries that keep its shape (k -> k & ~1: a half turn and/or a flip),
                # each as likely as before; a square one keeps all 8, drawn as before.
                k &= ~1
            arrays = [dihedral(a, k) for a in arrays]
        return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in arrays)
