"""Multi-page TIFF stacks, the ISBI 2012 challenge's own format (train-volume.tif, train-labels.tif,
test-volume.tif) and how EM labs usually store their data.

A stack's slices are named by page index ("0", "1", ...), so everything that works on a folder of
slices (held-out blocks, metrics, pictures) works on a stack. Pages are read with OpenCV; the page
table is walked here first, since OpenCV reads a truncated stack's surviving pages without a word.
"""

import functools
import os
import struct

import cv2
import numpy as np

from isbi_unet.errors import DataError, WriteError, atomic_write

STACK_EXTS = (".tif", ".tiff")
# TIFF field types whose values are offsets or byte counts: SHORT, LONG, LONG8
SIZES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}
DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)


def is_stack(path):
    return os.path.isfile(path) and path.lower().endswith(STACK_EXTS)


def count_pages(path):
    """The number of pages of TIFF `path`; a DataError when its page table or pixel data run past its end."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] not in (b"II", b"MM") or len(head) < 8:
            raise DataError(f"{path}: not a TIFF file")
        e = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(e + "H", head[2:4])[0] == 43  # BigTIFF: 8-byte offsets
        offset = struct.unpack(e + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        pages, seen = 0, set()
        while offset:
            if offset in seen or offset >= size:
                raise DataError(f"{path}: truncated or corrupt TIFF (page {pages + 1}'s table is missing)")
            seen.add(offset)
            check_page_data(f, e, big, offset, size, path, pages)
            pages += 1
            f.seek(offset)
            n = struct.unpack(e + ("Q" if big else "H"), f.read(8 if big else 2))[0]
            f.seek(offset + (8 if big else 2) + n * (20 if big else 12))
            tail = f.read(8 if big else 4)
            if len(tail) < (8 if big else 4):
                raise DataError(f"{path}: truncated or corrupt TIFF (page {pages}'s table is cut short)")
            offset = struct.unpack(e + ("Q" if big else "I"), tail)[0]
    return pages


def check_page_data(f, e, big, offset, size, path, page):
    """Raises DataError when a page's strips or tiles end past the end of the file."""
    f.seek(offset)
    n = struct.unpack(e + ("Q" if big else "H"), f.read(8 if big else 2))[0]
    entry = 20 if big else 12
    table = f.read(n * entry)
    if len(table) < n * entry:
        raise DataError(f"{path}: truncated or corrupt TIFF (page {page}'s table is cut short)")
    fields = {}
    for i in range(n):
        raw = table[i * entry : (i + 1) * entry]
        tag, kind = struct.unpack(e + "HH", raw[:4])
        count = struct.unpack(e + ("Q" if big else "I"), raw[4:12] if big else raw[4:8])[0]
        fields[tag] = (kind, count, raw[12:] if big else raw[8:])
    for offsets_tag, counts_tag in DATA_TAGS:
        if offsets_tag in fields and counts_tag in fields:
            starts = field_values(f, e, big, *fields[offsets_tag])
            lengths = field_values(f, e, big, *fields[counts_tag])
            if any(s + n > size for s, n in zip(starts, lengths)):
                raise DataError(f"{path}: truncated TIFF (page {page}'s pixels run past the end of the file)")


def field_values(f, e, big, kind, count, inline):
    if kind not in SIZES:
        return []
    code, width = SIZES[kind]
    if count * width <= len(inline):
        data = inline[: count * width]
    else:
        f.seek(struct.unpack(e + ("Q" if big else "I"), inline)[0])
        data = f.read(count * width)
    return list(struct.unpack(e + code * (len(data) // width), data[: len(data) // width * width]))


@functools.lru_cache(maxsize=4)
def read_pages(path):
    """All pages of stack `path` as OpenCV reads them (uint8/uint16, gray or colour), checked complete."""
    pages = count_pages(path)
    ok, images = cv2.imreadmulti(path, flags=cv2.IMREAD_UNCHANGED)
    if not ok or len(images) != pages:
        raise DataError(f"{path}: not a readable TIFF stack ({len(images) if ok else 0} of {pages} pages decoded)")
    return tuple(images)


def write_stack(path, pages):
    """Writes uint8 or float32 HxW pages as one multi-page TIFF, complete or not at all (errors.atomic_write)."""
    with atomic_write(path) as tmp:
        if not cv2.imwritemulti(tmp, [np.ascontiguousarray(p) for p in pages]):
            raise WriteError(f"{path}: cannot write (OpenCV could not write the TIFF stack)")
