"""Slices and labels on disk: listing, reading with checks, writing, standardising, splitting.

A source of slices is a folder of images or a multi-page TIFF stack (isbi_unet/stacks.py), whose
slices are named by page index. ISBI 2012 labels are 255 = cell, 0 = membrane. Every reader checks
what it reads and raises DataError with the path (and page); colour and 16-bit images are converted
with one warning line each (one per stack).
"""

import os
import re

import cv2
import numpy as np

from isbi_unet.errors import DataError, atomic_write, warn
from isbi_unet.formats import POOL
from isbi_unet.stacks import STACK_EXTS, count_pages, is_stack, read_pages

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
CHANNELS = {2: "gray+alpha", 3: "RGB", 4: "RGBA"}


def natural_key(name):
    # 2.png before 10.png, as the slices are numbered.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_images(folder):
    if os.path.isfile(folder):
        raise DataError(f"{folder}: a file, not a folder of images (of single files, only a .tif stack is read)")
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)
    if not names:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
    return names


def read_gray(path, warned=None):
    """An 8-bit single-channel image as a uint8 HxW array; colour and 16-bit files are converted with
    one warning line, as a silently converted file is how a wrong dataset goes unnoticed (once per `warned`
    set, for a reader that reads a file again)."""
    if not os.path.isfile(path):  # checked here, as OpenCV would add a warning line of its own
        raise DataError(f"{path}: no such file")
    pages = count_pages(path) if path.lower().endswith(STACK_EXTS) else 1
    if pages > 1:  # never read as its first page alone
        raise DataError(
            f"{path}: a stack of {pages} pages inside a folder of images; pass the stack itself "
            "(--Test_Data_path STACK.tif, or train-volume.tif and train-labels.tif in --data_path)"
        )
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return to_gray(img, path, warned)


def to_gray(img, path, warned=None):
    """`img` as uint8 HxW; a conversion is said in one warning, or once per `warned` set (a stack's pages)."""
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
        img, bits = to_8_bit(img)
    if kind and deep:
        message = f"16-bit {kind} image converted to 8-bit grayscale{used_bits(bits)}"
    elif kind:
        message = f"{kind} image converted to grayscale"
    elif deep:
        message = f"16-bit image scaled to 8-bit{used_bits(bits)}"
    if (kind or deep) and (warned is None or message not in warned):
        warn(f"{path}: {message}")
        if warned is not None:
            warned.add(message)
    return img


def to_8_bit(img):
    """A uint16 image scaled to uint8 from the bits its values use, and that bit count.

    Cameras and microscopes store 10-, 12- or 14-bit data in 16-bit files; dividing by 257 would
    leave such an image a handful of grey levels, so the full scale is 2**bits - 1 of its own values.
    """
    bits = max(8, int(img.max()).bit_length())
    return (img.astype(np.float32) * (255.0 / (2**bits - 1)) + 0.5).astype(np.uint8), bits


def used_bits(bits):
    return "" if bits == 16 else f" (its values use {bits} bits; those are what was kept)"


_warned = {}  # per stack: the conversions already said


def slice_names(source):
    """Names of the slices at `source`: a folder's image files, or a stack's page indices ("0", "1", ...)."""
    if is_stack(source):
        return [str(i) for i in range(len(read_pages(source)))]
    return list_images(source)


def slice_path(source, name):
    """How messages name a slice: the file, or the stack and page."""
    return f"{source} page {name}" if is_stack(source) else os.path.join(source, name)


def read_slice(source, name):
    """Slice `name` of `source` as uint8 HxW (converted as read_gray does; said once per stack)."""
    if not is_stack(source):
        return read_gray(os.path.join(source, name))
    return to_gray(read_pages(source)[int(name)], source, _warned.setdefault(os.path.abspath(source), set()))


def write_png(path, array):
    """Writes `array` as the PNG `path` in one rename: a full disk or a kill leaves the old file or none,
    and a failed write is a WriteError naming the path and the system's reason."""
    ok, png = cv2.imencode(".png", array)
    if not ok:  # not an image array: a bug, not the user's input
        raise ValueError(f"{path}: array of shape {array.shape} and type {array.dtype} cannot be a PNG")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(png.tobytes())


def to_unit(img):
    """uint8 HxW -> float32 1xHxW in [0, 1]."""
    return (img.astype(np.float32) / 255.0)[None]


def standardize(x):
    """Zero mean, unit variance over the whole slice.

    Slices differ in brightness and contrast, and the model should not learn one slice's exposure.
    Whole-slice statistics, also for crops and tiles, so that a crop in training and a tile in
    prediction see the same numbers as the whole slice would.
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
        raise DataError(
            f"{path}: not a binary label ({grey / label.size:.0%} of pixels are neither 0 nor 255; "
            "expected 0 = membrane, 255 = cell)"
        )


def check_same_size(array, path, image_shape):
    if array.shape != image_shape:
        raise DataError(
            f"{path}: size {array.shape[1]}x{array.shape[0]} differs from its image's {image_shape[1]}x{image_shape[0]}"
        )
    return array


def read_label(source, name=None, image_shape=None):
    """Label `name` of `source` (or the file `source`) as a uint8 0/255 array, checked: binary, and the
    size of its image's (H, W) when given.

    0/1 labels (a common way to save masks) are read as 0/255. A label that is mostly membrane gets a
    warning: ISBI's are about three quarters cell, so 255 = membrane (inverted) is the likely mistake.
    """
    label = read_gray(source) if name is None else read_slice(source, name)
    label_path = source if name is None else slice_path(source, name)
    if image_shape is not None:
        check_same_size(label, label_path, image_shape)
    if label.max() == 1:
        label = label * np.uint8(255)
    check_binary_label(label, label_path)
    cell = np.count_nonzero(label > 127) / label.size
    if cell < 0.5:
        warn(f"{label_path}: only {cell:.0%} of pixels are cell (255); is the label inverted (255 = membrane)?")
    return label


def read_pair(image_source, label_source, image_name, label_name):
    """A training image and its label as uint8 arrays, checked: same size, binary label."""
    image = read_slice(image_source, image_name)
    return image, read_label(label_source, label_name, image.shape)


def training_sources(data_path):
    """(images, labels) of --data_path: its image/ and label/ folders, or the challenge's two stacks."""
    image_dir, label_dir = os.path.join(data_path, "image"), os.path.join(data_path, "label")
    volume, labels = os.path.join(data_path, "train-volume.tif"), os.path.join(data_path, "train-labels.tif")
    if os.path.isdir(image_dir) or os.path.isdir(label_dir):
        return image_dir, label_dir
    if os.path.isfile(volume) or os.path.isfile(labels):
        for path in (volume, labels):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (a stack needs train-volume.tif and train-labels.tif)")
        return volume, labels
    raise DataError(f"{image_dir}: no such folder (nor train-volume.tif and train-labels.tif in {data_path})")


def find_pairs(image_dir, label_dir):
    """Slice names present in both sources (folders or stacks); any unpaired slice is an error."""
    images, labels = slice_names(image_dir), slice_names(label_dir)
    if is_stack(image_dir) and is_stack(label_dir) and len(images) != len(labels):
        raise DataError(f"{label_dir}: {len(labels)} pages, but {image_dir} has {len(images)}")

    def stem(name):
        return os.path.splitext(name)[0]

    label_by_stem = {stem(n): n for n in labels}
    image_stems = {stem(n) for n in images}
    missing = [n for n in images if stem(n) not in label_by_stem]
    if missing:
        raise DataError(
            f"{image_dir}: {len(missing)} image(s) without a label in {label_dir}: {', '.join(missing[:5])}"
        )
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
        raise DataError(
            f"{where}: --val_start {start} with --val_slices {count} runs past the last of {len(names)} slices"
        )
    return names[:first] + names[first + count :], names[first : first + count]


def split_names(data_path, val_slices, val_start=-1):
    """Train and validation slice names of `data_path` (training_sources); validation is one block."""
    names = [image for image, _ in find_pairs(*training_sources(data_path))]
    return held_out_block(names, val_slices, val_start, data_path)


def evenly_spaced(n, count):
    """Indices of `count` items spread evenly over 0..n-1 (all n if count >= n), e.g. slices for precise BN."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def dihedral(arr, k):
    """The k-th (0..7) of the 8 symmetries of the square, applied to the last two axes."""
    if k >= 4:
        arr = arr[..., ::-1]
    return np.ascontiguousarray(np.rot90(arr, k % 4, axes=(-2, -1)))


def inverse_dihedral(arr, k):
    """Undoes dihedral(arr, k): rotate back, then flip back."""
    arr = np.rot90(arr, -(k % 4), axes=(-2, -1))
    if k >= 4:
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr)


def output_names(folder, names):
    """NAME.png for each input; two inputs that would share one output name are refused."""
    outputs = {}
    for name in names:
        out = os.path.splitext(name)[0] + ".png"
        if out in outputs:
            raise DataError(f"{folder}: {outputs[out]} and {name} would both be written as {out}; rename one")
        outputs[out] = name
    return list(outputs)


def read_to_segment(path, label_path=None):
    """(names, output PNG names, images, labels or None) of a folder or stack to segment, all checked
    before any work: every slice decodes and is large enough, and labels (if given) pair with them."""
    names = slice_names(path)
    out_names = output_names(path, names)
    images = [read_slice(path, n) for n in names]
    small = [n for n, im in zip(names, images) if min(im.shape) < POOL]
    if small:
        raise DataError(f"{slice_path(path, small[0])}: smaller than {POOL} pixels, too small for four poolings")
    labels = read_labels(label_path, names, images) if label_path else None
    return names, out_names, images, labels


def read_labels(label_path, names, images):
    """The label of every input slice (same name, or same page), checked like training labels."""
    present = set(slice_names(label_path))
    for name in names:
        if name not in present:
            raise DataError(f"{slice_path(label_path, name)}: no label for {name}")
    return [read_label(label_path, name, image.shape) for name, image in zip(names, images)]
