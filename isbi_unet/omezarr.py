"""OME-Zarr images in and out (NGFF 0.4 on zarr v2): what napari, neuroglancer, webKnossos and BigDataViewer read.

    source = open_omezarr("volume.ome.zarr")     # level 0 of the multiscales; axes ending in y, x (2-D or z/y/x)
    source.names, source.shape(z), source.dtype  # one slice per z
    window = source.read(z, slice(0, 512), slice(0, 512))   # raw pixels, read chunk by chunk through zarr
    sink = OmeZarrSink("out/prob.ome.zarr", source, to_prob_8, "prob")   # chunked like the input, its axes, scale
    sink.write(block, prob_core); sink.close()

Axes other than z, y and x must have size 1 (a time point, one channel); a channel axis of size > 1 is refused,
since the model sees one gray channel. Pixels are uint8, uint16 or float (taken as already on 0..1). zarr reads a
chunk missing from the store as its fill value without a word; here every chunk a read touches must be present
(a store written with write_empty_chunks=False, which leaves all-zero chunks out, has to be written again), and a
chunk that cannot be decoded (truncated, corrupt) is one DataError naming it. Needs zarr 2.18 and ome-zarr 0.11
(requirements-volumes.txt, CPython 3.10+), imported only when an OME-Zarr path is given.
"""

import itertools
import json
import os

import numpy as np

from isbi_unet.blocks import EXACT_STATS_PIXELS, STATS_ROWS, exact_stats, streaming_stats
from isbi_unet.errors import DataError, cannot_write, warn
from isbi_unet.images import used_bits

INSTALL = "pip install -r requirements-volumes.txt (CPython 3.10+), or `source setup.sh`"
NGFF_VERSION = "0.4"
PIXEL_KINDS = "uint8, uint16 or float"
BLOSC_HEADER = 16  # bytes; it holds the compressed size the stored chunk must have
OUTPUTS = ("prob.ome.zarr", "mask.ome.zarr")  # in --save_res_path: probability x 255, the mask (255 = cell)


def import_zarr():
    try:
        import zarr
    except ImportError:
        raise DataError(f"OME-Zarr images need zarr and ome-zarr, which are not installed: {INSTALL}") from None
    return zarr


def is_omezarr(path):
    """Whether `path` is meant as a zarr store: named *.zarr, or a folder with zarr's own metadata files."""
    path = str(path).rstrip("/")
    if path.lower().endswith(".zarr"):
        return True
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in (".zgroup", ".zattrs", "zarr.json")
    )


def read_attrs(path):
    """The store's group attributes; its absence or a zarr v3 store (NGFF 0.5) is one DataError."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such OME-Zarr folder")
    if os.path.isfile(os.path.join(path, "zarr.json")) and not os.path.isfile(os.path.join(path, ".zattrs")):
        raise DataError(f"{path}: a zarr v3 store (OME-Zarr 0.5); only NGFF {NGFF_VERSION} (zarr v2) is read")
    try:
        with open(os.path.join(path, ".zattrs")) as f:
            attrs = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not an OME-Zarr image (no .zattrs with multiscales metadata)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable .zattrs ({e})") from None
    if not isinstance(attrs, dict):
        raise DataError(f"{path}: .zattrs is not a JSON object")
    return attrs


def image_metadata(path):
    """The first multiscales entry of the image at `path`, checked: NGFF 0.4, axes, a level-0 dataset."""
    attrs = read_attrs(path)
    multiscales = attrs.get("multiscales")
    if not multiscales:
        if os.path.isfile(os.path.join(path, "0", ".zattrs")):  # bioformats2raw's layout: images in 0/, 1/, ...
            raise DataError(f"{path}: a collection of OME-Zarr images; pass one of them, e.g. {path}/0")
        raise DataError(f"{path}: not an OME-Zarr image (.zattrs has no multiscales metadata)")
    meta = multiscales[0]
    version = meta.get("version")
    if version != NGFF_VERSION:
        raise DataError(f"{path}: OME-Zarr (NGFF) version {version}; only {NGFF_VERSION} is read")
    axes, datasets = meta.get("axes"), meta.get("datasets")
    if not axes or not datasets or not all(isinstance(a, dict) and "name" in a for a in axes):
        raise DataError(f"{path}: multiscales metadata without axes or datasets")
    check_axes(path, axes)
    return meta


def check_axes(path, axes):
    """ome-zarr-py's own rules for NGFF 0.4 axes (types, order), which its writer applies to the outputs too."""
    from ome_zarr.axes import Axes
    from ome_zarr.format import FormatV04

    try:
        Axes(axes, FormatV04()).validate()
    except (ValueError, KeyError, TypeError) as e:
        names = ", ".join(str(a.get("name")) for a in axes)
        raise DataError(f"{path}: axes {names} are not valid NGFF {NGFF_VERSION} ({e})") from None


def slice_axes(path, axes, shape):
    """The positions of the z (or None), y and x axes; any other axis must have size 1."""
    names = [a["name"].lower() for a in axes]
    if len(names) != len(shape):
        raise DataError(f"{path}: {len(names)} axes ({', '.join(names)}) for an array of {len(shape)} dimensions")
    if names[-2:] != ["y", "x"]:
        raise DataError(f"{path}: axes {', '.join(names)}; the last two must be y, x")
    z = names.index("z") if "z" in names else None
    for i, (axis, size) in enumerate(zip(axes, shape)):
        if i in (z, len(shape) - 2, len(shape) - 1) or size == 1:
            continue
        if axis.get("type") == "channel" or axis["name"].lower() == "c":
            raise DataError(f"{path}: {size} channels (axis {axis['name']}); only single-channel images are segmented")
        raise DataError(f"{path}: axis {axis['name']} has {size} entries; only z, y, x may be longer than 1")
    return z, len(shape) - 2, len(shape) - 1


def check_pixels(path, dtype):
    if dtype in (np.uint8, np.uint16) or np.issubdtype(dtype, np.floating):
        return
    raise DataError(f"{path}: unsupported pixel type {dtype}; expected {PIXEL_KINDS}")


class OmeZarrSource:
    """Level 0 of an OME-Zarr image, slice by slice along z: the volume Source protocol (isbi_unet/volume.py)."""

    def __init__(self, path):
        zarr = import_zarr()
        self.path = str(path).rstrip("/")
        self.meta = image_metadata(self.path)
        level = self.meta["datasets"][0]
        try:
            self.array = zarr.open_array(os.path.join(self.path, level["path"]), mode="r")
        except (ValueError, KeyError, OSError) as e:  # zarr's words for a missing or unreadable .zarray
            raise DataError(f"{self.path}: level 0 ({level['path']}) is not a readable zarr array ({e})") from None
        check_pixels(self.path, self.array.dtype)
        self.z_axis, self.y_axis, self.x_axis = slice_axes(self.path, self.meta["axes"], self.array.shape)
        depth = self.array.shape[self.z_axis] if self.z_axis is not None else 1
        self.names = [str(z) for z in range(depth)]
        self.dtype = self.array.dtype
        self.warned = False

    @property
    def axes(self):
        return self.meta["axes"]

    @property
    def transforms(self):
        """(level 0's coordinateTransformations, the multiscales' own or None): the physical scale to pass on."""
        return self.meta["datasets"][0].get("coordinateTransformations"), self.meta.get("coordinateTransformations")

    def identity(self):
        """What a stopped run's blocks depend on, cheaply: the image's path and its metadata files' sizes and
        modification times (a chunk rewritten in place is not seen; a new image is)."""
        files = [
            os.path.join(self.path, ".zattrs"),
            os.path.join(self.path, self.meta["datasets"][0]["path"], ".zarray"),
        ]
        return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in map(os.path.abspath, files)]

    def shape(self, z=0):
        return self.array.shape[self.y_axis], self.array.shape[self.x_axis]

    def stats(self, z):
        """Slice z's SliceStats: as images.preprocess computes them for a slice that fits, else streamed in bands
        of whole chunk rows (each chunk decoded once per pass). A 16-bit image's scaling is said once, as a
        16-bit TIFF's is."""
        h, w = self.shape(z)
        if h * w <= EXACT_STATS_PIXELS:
            stats = exact_stats(self.read(z, slice(0, h), slice(0, w)))
        else:
            chunk = self.array.chunks[self.y_axis]
            rows = max(chunk, STATS_ROWS // chunk * chunk)
            stats = streaming_stats(lambda ys: self.read(z, ys, slice(0, w)), (h, w), self.dtype, rows)
        if self.dtype == np.uint16 and not self.warned:
            self.warned = True
            warn(f"{self.path}: 16-bit image scaled to 8-bit{used_bits(stats.bits)}")
        return stats

    def describe(self, z):
        return f"{self.path} z {z}" if self.z_axis is not None else self.path

    def index(self, z, ys, xs):
        """The array index of slice z's rows ys and columns xs: the size-1 axes at 0."""
        index = [0] * self.array.ndim
        if self.z_axis is not None:
            index[self.z_axis] = z
        index[self.y_axis], index[self.x_axis] = ys, xs
        return tuple(index)

    def chunk_keys(self, index):
        """The store keys of every chunk that array[index] reads."""
        ranges = []
        for i, chunk in zip(index, self.array.chunks):
            start, stop = (i, i + 1) if isinstance(i, int) else (i.start, i.stop)
            ranges.append(range(start // chunk, (stop - 1) // chunk + 1))
        return [self.array._chunk_key(c) for c in itertools.product(*ranges)]  # zarr 2's key layout, as it reads

    def chunk_name(self, key):
        """How messages name a chunk: its file under the image (level path included)."""
        return f"{self.meta['datasets'][0]['path']}/{key}"

    def read(self, z, ys, xs):
        """Rows ys, columns xs of slice z, raw dtype; a missing or undecodable chunk is one DataError."""
        index = self.index(z, slice(*ys.indices(self.shape()[0])[:2]), slice(*xs.indices(self.shape()[1])[:2]))
        keys = self.chunk_keys(index)
        missing = [k for k in keys if k not in self.array.store]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{self.path}: chunk {self.chunk_name(missing[0])} is missing{more}; zarr would read it as zeros "
                "(a store written with write_empty_chunks=False has to be written again)"
            )
        for key in keys:
            self.check_chunk(key)
        try:
            return self.array[index]
        except Exception:  # numcodecs raises RuntimeError, ValueError, ... by codec: find the chunk and name it
            raise DataError(
                f"{self.path}: chunk {self.chunk_name(self.broken_chunk(keys))} is truncated or corrupt"
            ) from None

    def check_chunk(self, key):
        """Refuses a chunk whose stored size contradicts its own header: Blosc decodes a truncated chunk into
        garbage without an error (measured: a chunk cut to 20 bytes read back as noise), and an uncompressed
        one must hold the whole chunk. Other codecs fail on a truncated stream by themselves."""
        raw = self.array.store[key]
        whole = int(np.prod(self.array.chunks)) * self.array.dtype.itemsize
        compressor = self.array.compressor
        if compressor is None:
            intact = self.array.filters or len(raw) == whole
        elif compressor.codec_id == "blosc":
            from numcodecs.blosc import cbuffer_sizes

            intact = len(raw) >= BLOSC_HEADER and cbuffer_sizes(raw)[1] == len(raw)
        else:
            intact = True
        if not intact:
            raise DataError(
                f"{self.path}: chunk {self.chunk_name(key)} is truncated or corrupt ({len(raw)} bytes stored)"
            )

    def broken_chunk(self, keys):
        """The first of `keys` that does not decode to a whole chunk."""
        for key in keys:
            try:
                self.array._decode_chunk(self.array.store[key])  # zarr 2's own decoder: filters and compressor
            except Exception:
                return key
        return keys[0]


def open_omezarr(path):
    return OmeZarrSource(path)


class OmeZarrSink:
    """An OME-Zarr image shaped, chunked and scaled like `source`, written block by block (the volume Sink
    protocol); `convert(prob) -> uint8` maps the probabilities to what is stored (x 255, or the mask).
    `resume=True` reopens the store a stopped run left, to continue it.

    Written with zarr (the pixels) and ome-zarr-py's writer (the NGFF metadata), so ome-zarr's reader and
    napari-ome-zarr open it; one level, uint8; every chunk is stored, all-zero ones too.
    """

    per_slice = False

    def __init__(self, path, source, convert, name, resume=False):
        self.path, self.source, self.convert, self.name = str(path), source, convert, name
        try:
            if resume and os.path.isdir(os.path.join(self.path, "0")):
                self.array = import_zarr().open_array(os.path.join(self.path, "0"), mode="r+")
            else:
                self.array = self.create()
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def create(self):
        zarr = import_zarr()
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_multiscales_metadata

        group = zarr.open_group(self.path, mode="w")
        array = group.create_dataset(
            "0",
            shape=self.source.array.shape,
            chunks=self.source.array.chunks,
            dtype=np.uint8,
            fill_value=0,
            dimension_separator="/",  # NGFF 0.4's layout
            write_empty_chunks=True,  # a reader (this one too) can then tell a lost chunk from an empty one
        )
        level, overall = self.source.transforms
        extra = {"coordinateTransformations": overall} if overall else {}
        datasets = [{"path": "0", **({"coordinateTransformations": level} if level else {})}]
        write_multiscales_metadata(group, datasets, FormatV04(), self.source.axes, self.name, **extra)
        return array

    def write(self, block, prob):
        """Writes a block's core (idempotent: the same block gives the same bytes); each chunk file in one rename
        (zarr's DirectoryStore), so a kill leaves every chunk whole."""
        index = self.source.index(block.z, slice(block.y0, block.y1), slice(block.x0, block.x1))
        try:
            self.array[index] = self.convert(prob)
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def end_slice(self, z):
        pass

    def close(self):
        pass
