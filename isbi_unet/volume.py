"""Blockwise prediction of slices and stacks of any size at bounded memory, the same answer however it is cut.

    source = open_source("volume.tif")               # a TIFF stack (read page by page, window by window) or a folder
    sinks = [PngSink(...), TiffSink(...)]            # written block by block as results arrive
    run_blocks(source, blocks, spec, sinks, executor, journal)   # continues where a stopped run ended

The engine reads each block's window (isbi_unet/blocks.py: the core grown by the halo) and standardises it with the
whole slice's statistics here, in the parent, at most 2 x workers windows at once; an executor runs
`forward_window(spec, window, core)` (in this process, in a pool of processes, or elsewhere); each result goes to
every sink as it arrives, and only then is the block marked finished in the journal (an append-only file in the
output folder, fsynced). A rerun with the same model, input and settings (the journal's fingerprint) skips the
finished blocks; its result is identical, since every block is computed from the same window and statistics.

Executors share three calls: `submit(fn, *args) -> future`, `done(futures) -> the finished ones` (waits for at
least one) and `close()`. `LocalExecutor` runs in this process; `PoolExecutor` in worker processes that each load
the model once, die with this process, and whose loss (killed, out of memory) redoes their blocks in a new pool.
"""

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import cv2
import numpy as np

from isbi_unet.blocks import (
    EXACT_STATS_PIXELS,
    HALO,
    Block,
    block_side,
    exact_stats,
    padded_shape,
    plan_blocks,
    read_padded,
    read_window,
    standardise,
    streaming_stats,
    window_pixels,
)
from isbi_unet.cluster import DaskExecutor
from isbi_unet.errors import DataError, cannot_write, warn
from isbi_unet.formats import POOL
from isbi_unet.images import CHANNELS, list_images, read_gray, used_bits, write_png
from isbi_unet.omezarr import OUTPUTS as OMEZARR_OUTPUTS
from isbi_unet.omezarr import OmeZarrSink, OmeZarrSource, is_omezarr
from isbi_unet.predictor import worker_predictor
from isbi_unet.process import Interrupted, worker_signals
from isbi_unet.process.runtime import Terminated, tie_to_launcher
from isbi_unet.stacks import count_pages, is_stack

PROB_DIR = "prob"  # the probability PNGs' folder in the output folder, beside the masks
JOURNAL = "blocks.journal"  # finished blocks of a stopped run, in the output folder
POOL_RESTARTS = 2  # a pool that loses a worker is rebuilt this often before the run stops with one line
PROGRESS_STEP = 0.1  # without a terminal: a line per tenth of the work ...
QUIET_SECONDS = 10  # ... once the run has lasted this long


# ---------------------------------------------------------------------------------------------------- sources


class FolderSource:
    """A folder of image files, one slice each, read whole (PNG and friends cannot be read by window) and kept
    for the two slices in flight; converted to 8-bit grey as images.read_gray does."""

    def __init__(self, path):
        self.path = path
        self.names = list_images(path)
        self.dtype = np.dtype(np.uint8)
        self._shapes = {}
        self.warned = {}  # name -> conversions said

    def slice(self, z):
        return _read_whole(self, z)

    def shape(self, z):
        if z not in self._shapes:
            self._shapes[z] = self.slice(z).shape
        return self._shapes[z]

    def read(self, z, ys, xs):
        return self.slice(z)[ys, xs]

    def stats(self, z):
        image = self.slice(z)
        if image.size <= EXACT_STATS_PIXELS:
            return exact_stats(image)
        return streaming_stats(lambda ys: image[ys], image.shape, image.dtype)

    def describe(self, z):
        return os.path.join(self.path, self.names[z])


@functools.lru_cache(maxsize=2)
def _read_whole(source, z):
    """Slice z of a FolderSource, converted as images.read_gray does, each conversion said once per file."""
    name = source.names[z]
    return read_gray(os.path.join(source.path, name), source.warned.setdefault(name, set()))


class TiffSource:
    """A multi-page TIFF read page by page: an uncompressed page through a memory map of its pixels (only the
    window's rows are touched), another one decoded whole by tifffile (kept for the two pages in flight).
    Colour pages are converted to grey window by window, 16-bit ones scaled with the page's bit count
    (blocks.SliceStats); each conversion is said once per stack."""

    def __init__(self, path):
        self.path = path
        tifffile = import_tifffile()
        count_pages(path)  # a truncated file or page table is one line before anything is read
        try:
            self.tiff = tifffile.TiffFile(path)
            pages = [self.tiff.pages[i] for i in range(len(self.tiff.pages))]
        except Exception as e:  # tifffile's own errors for a file it cannot parse
            raise DataError(f"{path}: not a readable TIFF stack ({e})") from None
        self.names = [str(i) for i in range(len(pages))]
        self.pages = pages
        self._check(pages)
        self.dtype = np.dtype(pages[0].dtype)
        self.warned = set()

    def _check(self, pages):
        for i, page in enumerate(pages):
            if page.dtype not in (np.uint8, np.uint16):
                raise DataError(f"{self.path} page {i}: unsupported pixel type {page.dtype}; expected 8- or 16-bit")
            if page.shape[:2] != pages[0].shape[:2] or page.dtype != pages[0].dtype:
                raise DataError(
                    f"{self.path} page {i}: {page.shape[1]}x{page.shape[0]} {page.dtype} differs from page 0's "
                    f"{pages[0].shape[1]}x{pages[0].shape[0]} {pages[0].dtype}; a stack's pages share one size"
                )

    def shape(self, z):
        return tuple(self.pages[z].shape[:2])

    def pixels(self, z):
        """Page z's pixels as an array (a memory map where the page allows it)."""
        return _page_pixels(self, z)

    def read(self, z, ys, xs):
        part = np.asarray(self.pixels(z)[ys, xs])
        return self.grey(part)

    def grey(self, part):
        if part.ndim == 2:
            return part
        kind = CHANNELS.get(part.shape[2], f"{part.shape[2]}-channel")
        self.say(f"{kind} image converted to grayscale")
        if part.shape[2] == 3:
            return cv2.cvtColor(part, cv2.COLOR_RGB2GRAY)  # TIFF stores RGB; OpenCV's reader gave BGR, converted
        if part.shape[2] == 4:
            return cv2.cvtColor(part, cv2.COLOR_RGBA2GRAY)
        return np.ascontiguousarray(part[:, :, 0])

    def say(self, message):
        if message not in self.warned:
            self.warned.add(message)
            warn(f"{self.path}: {message}")

    def stats(self, z):
        h, w = self.shape(z)
        if h * w <= EXACT_STATS_PIXELS:
            stats = exact_stats(self.read(z, slice(0, h), slice(0, w)))
        else:
            stats = streaming_stats(lambda ys: self.read(z, ys, slice(0, w)), (h, w), self.dtype)
        if self.dtype == np.uint16:
            self.say(f"16-bit image scaled to 8-bit{used_bits(stats.bits)}")
        return stats

    def describe(self, z):
        return f"{self.path} page {z}"


def import_tifffile():
    try:
        import tifffile
    except ImportError:
        raise DataError("TIFF stacks need tifffile, which is not installed: pip install -r requirements.txt") from None
    return tifffile


@functools.lru_cache(maxsize=2)
def _page_pixels(source, z):
    page = source.pages[z]
    if page.is_memmappable:
        return np.memmap(source.path, page.dtype, "r", page.dataoffsets[0], page.shape)
    return page.asarray()


# (accepts(path) -> bool, class): other kinds of input register here, checked before TIFF/folder
SOURCES = [(is_omezarr, OmeZarrSource)]


def open_source(path):
    """The Source for `path`: a registered kind, a TIFF stack, or a folder of images."""
    for accepts, kind in SOURCES:
        if accepts(path):
            return kind(path)
    return TiffSource(path) if is_stack(path) else FolderSource(path)


def read_block_window(source, block, stats, halo=HALO):
    """Block's window, read from `source` and standardised with its slice's `stats`: float32 1xhxw, and the
    core's (cy, cx, h, w) inside it."""
    shape = source.shape(block.z)
    window, (cy, cx) = read_window(block, shape, halo)
    pixels = read_padded(lambda ys, xs: source.read(block.z, ys, xs), window, shape)
    return standardise(pixels, stats), (cy, cx, block.y1 - block.y0, block.x1 - block.x0)


# ---------------------------------------------------------------------------------------------------- sinks


def to_prob_8(prob):
    return np.round(prob * 255).astype(np.uint8)


def to_mask(prob, threshold):
    return np.where(prob >= threshold, 255, 0).astype(np.uint8)


class PngSink:
    """NAME.png (mask) and prob/NAME.png per slice, each written once its slice is complete (kept until then as
    two uint8 maps); the journal then marks the slice's blocks finished together (per_slice)."""

    per_slice = True

    def __init__(self, folder, out_names, shapes, threshold):
        self.folder, self.out_names, self.shapes, self.threshold = folder, out_names, shapes, threshold
        self.open = {}  # z -> (prob uint8, mask uint8)

    def write(self, block, prob):
        if block.z not in self.open:
            self.open[block.z] = tuple(np.zeros(self.shapes[block.z], np.uint8) for _ in range(2))
        prob8, mask = self.open[block.z]
        prob8[block.y0 : block.y1, block.x0 : block.x1] = to_prob_8(prob)
        mask[block.y0 : block.y1, block.x0 : block.x1] = to_mask(prob, self.threshold)

    def end_slice(self, z):
        prob8, mask = self.open.pop(z)
        write_png(os.path.join(self.folder, PROB_DIR, self.out_names[z]), prob8)
        write_png(os.path.join(self.folder, self.out_names[z]), mask)

    def close(self):
        self.open.clear()


class TiffSink:
    """A Z x H x W TIFF stack written block by block, row by row at its pages' offsets (uncompressed, contiguous,
    BigTIFF beyond 4 GB). The file is made at full size on disk first (a full disk fails then, not mid-run), so a
    write never allocates; each block is fsynced before the journal counts it. Rewriting a block writes the same
    bytes. `convert(prob) -> array of dtype` maps probabilities to the stored values."""

    per_slice = False

    def __init__(self, path, shape_zhw, dtype, convert, resume=False):
        self.path, self.dtype, self.convert = path, np.dtype(dtype), convert
        if not (resume and os.path.isfile(path)):
            create_tiff(path, shape_zhw, self.dtype)
        self.offsets = page_offsets(path)
        self.width = shape_zhw[2]
        try:
            self.fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise cannot_write(path, e) from None

    def write(self, block, prob):
        data = np.ascontiguousarray(self.convert(prob), self.dtype)
        size = self.dtype.itemsize
        try:
            for i, row in enumerate(data):
                offset = self.offsets[block.z] + ((block.y0 + i) * self.width + block.x0) * size
                os.pwrite(self.fd, row.tobytes(), offset)
            os.fsync(self.fd)
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def end_slice(self, z):
        pass

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


BIGTIFF_FROM = 2**32 - 2**25  # classic TIFF offsets are 32-bit: beyond about 4 GB, BigTIFF


def create_tiff(path, shape_zhw, dtype):
    """An uncompressed TIFF stack of zeros at `path`, its pixel bytes allocated on disk (posix_fallocate)."""
    import tifffile

    big = int(np.prod(shape_zhw)) * dtype.itemsize > BIGTIFF_FROM
    try:
        image = tifffile.memmap(path, shape=tuple(shape_zhw), dtype=dtype, bigtiff=big, photometric="minisblack")
        del image
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        raise cannot_write(path, e) from None


def page_offsets(path):
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        return [page.dataoffsets[0] for page in tiff.pages]


class ArraySink:
    """Keeps every slice's float32 probabilities in memory (for --label_path scores, which need them whole)."""

    per_slice = False

    def __init__(self, shapes):
        self.shapes, self.probs = shapes, {}

    def write(self, block, prob):
        if block.z not in self.probs:
            self.probs[block.z] = np.zeros(self.shapes[block.z], np.float32)
        self.probs[block.z][block.y0 : block.y1, block.x0 : block.x1] = prob

    def end_slice(self, z):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------------- journal


class Journal:
    """Finished blocks, one line each after a first line holding the run's fingerprint; appended and fsynced, so
    a block is listed only once every sink holds it. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, path, fingerprint):
        self.path, self.fingerprint = path, fingerprint
        self.finished = set()
        if os.path.isfile(path):
            self.finished = self.read()
        if not self.finished:
            self.append([json.dumps(fingerprint, sort_keys=True)], mode="w")

    def read(self):
        with open(self.path) as f:
            lines = f.read().split("\n")
        if not lines or lines[0] != json.dumps(self.fingerprint, sort_keys=True):
            return set()
        return {Block(*map(int, line.split())) for line in lines[1:-1] if len(line.split()) == 5}

    def append(self, lines, mode="a"):
        try:
            with open(self.path, mode) as f:
                f.write("".join(f"{line}\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def add(self, blocks):
        self.append([" ".join(map(str, b)) for b in blocks])
        self.finished.update(blocks)


def file_digest(path):
    """sha256 of a file, or of a folder's files (names and contents): what the model is."""
    digest = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns)
    for p in paths:
        digest.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def input_identity(source):
    """What the input is, cheaply (an input may be terabytes): each file's path, size and modification time (or
    what a source says it is: an OME-Zarr image's metadata files)."""
    if hasattr(source, "identity"):
        return source.identity()
    root = os.path.abspath(source.path)
    files = [root] if os.path.isfile(root) else [os.path.join(root, n) for n in source.names]
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


# ---------------------------------------------------------------------------------------------------- executors


def forward_window(spec, window, core):
    """The probabilities of a block's core: this process's predictor (loaded once) on the standardised window."""
    cy, cx, h, w = core
    predictor = worker_predictor(spec)
    if predictor.size:  # a fixed-size ONNX export tiles a whole slice itself, as before blocks: its unpadded pixels
        window = window[:, : cy + h, : cx + w]
    return predictor.window(window)[cy : cy + h, cx : cx + w]


class LocalExecutor:
    """Runs each block in this process, at submit time."""

    workers = 1

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def done(self, futures):
        return list(futures)

    def close(self):
        pass


def init_worker():
    worker_signals()  # Ctrl-C reaches the whole group and the parent stops the pool; SIGTERM ends a worker
    tie_to_launcher()  # PR_SET_PDEATHSIG: a worker never outlives the run, even a SIGKILLed one


class PoolExecutor:
    """`workers` processes (spawn: OneFlow's threads do not survive a fork), each loading the model once.

    Windows travel through files (spill), not the pool's pipe: a pipe write of megabytes blocks until a worker
    reads it, and when that worker is killed the writing thread waits forever, and the pool's shutdown (also at
    exit) with it. A file costs a write and a read per block, small beside its forward pass."""

    def __init__(self, workers):
        self.workers = workers
        sweep_scratch()
        self.scratch = tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-")
        self.spilled = {}  # future -> its window files
        self.pool = self.start()

    def start(self):
        context = multiprocessing.get_context("spawn")
        return concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=init_worker)

    def submit(self, fn, *args):
        args = [spill(a, self.scratch) if isinstance(a, np.ndarray) else a for a in args]
        future = self.pool.submit(call_spilled, fn, *args)
        self.spilled[future] = [a for a in args if isinstance(a, Spilled)]
        return future

    def done(self, futures):
        finished = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED).done
        for future in finished:
            for spilled in self.spilled.pop(future, []):
                with contextlib.suppress(OSError):
                    os.remove(spilled.path)
        return finished

    def restart(self):
        self.stop()
        self.pool = self.start()

    def stop(self):
        """Stops every worker now, with SIGKILL: a stopped run does not wait for their blocks, and a worker still
        starting up (its signals as the parent had them: SIGTERM ignored under nohup) must not keep it waiting."""
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for p in processes:
            p.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for p in processes:
            p.join()

    def close(self):
        self.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


SCRATCH = "isbi-unet-windows-"  # + the parent's pid: the temporary folder of a pool's windows


SCRATCH_IDLE = 3600  # s: a live run writes windows into its folder all the time


def sweep_scratch():
    """Removes the window folders of runs whose process is gone: a SIGKILLed run cannot remove its own. Only folders
    idle for an hour, in case a /tmp is shared with another pid namespace, whose live pids are not seen here."""
    for name in os.listdir(tempfile.gettempdir()):
        pid, path = name[len(SCRATCH) :].split("-")[0], os.path.join(tempfile.gettempdir(), name)
        if name.startswith(SCRATCH) and pid.isdigit() and not process_alive(int(pid)) and idle(path, SCRATCH_IDLE):
            shutil.rmtree(path, ignore_errors=True)


def idle(path, seconds):
    try:
        return time.time() - os.path.getmtime(path) > seconds
    except OSError:
        return False


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Spilled(NamedTuple):
    """An array saved to a file, for a worker process to load."""

    path: str


def spill(array, folder):
    fd, path = tempfile.mkstemp(suffix=".npy", dir=folder)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    return Spilled(path)


def call_spilled(fn, *args):
    return fn(*[np.load(a.path) if isinstance(a, Spilled) else a for a in args])


def make_executor(workers, scheduler=None, timeout=None):
    """This process, a pool of `workers` processes, or the Dask cluster at `scheduler` (isbi_unet/cluster.py)."""
    if scheduler:
        return DaskExecutor(scheduler, timeout)
    return LocalExecutor() if workers == 1 else PoolExecutor(workers)


# ---------------------------------------------------------------------------------------------------- the engine


class Progress:
    """A tqdm bar (rate, ETA) on a terminal (stderr); else, once a run has lasted QUIET_SECONDS, a line on stdout per
    tenth of the pixels (logs, CI): a run of a few slices says nothing but its summary."""

    def __init__(self, total, done=0):
        self.total, self.done, self.start, self.first = total, done, time.time(), done
        self.next_line = PROGRESS_STEP
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total / 1e6, initial=done / 1e6, unit="Mpx", unit_scale=False, file=sys.stderr)

    def update(self, pixels):
        self.done += pixels
        if self.bar is not None:
            self.bar.update(pixels / 1e6)
            return
        fraction, seconds = self.done / self.total, time.time() - self.start
        if fraction + 1e-9 < self.next_line or seconds < QUIET_SECONDS:
            return
        while self.next_line <= fraction + 1e-9:
            self.next_line += PROGRESS_STEP
        rate = (self.done - self.first) / seconds
        left = (self.total - self.done) / rate if rate else 0.0
        print(
            f"predicted {fraction:.0%} ({self.done / 1e6:.1f} of {self.total / 1e6:.1f} Mpx, {rate / 1e6:.2f} Mpx/s, "
            f"about {left:.0f} s left)",
            flush=True,
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plan_volume(source, side):
    """Every block of every slice, slice by slice."""
    return [b._replace(z=z) for z in range(len(source.names)) for b in plan_blocks(source.shape(z), side)]


def block_pixels(block):
    return (block.y1 - block.y0) * (block.x1 - block.x0)


class Engine:
    """Runs `blocks` (not yet in `journal`) of `source` through `executor` into `sinks`."""

    def __init__(self, source, spec, sinks, executor, journal, progress=True, max_in_flight=None):
        self.source, self.spec, self.sinks, self.executor, self.journal = source, spec, sinks, executor, journal
        self.max_in_flight = max_in_flight
        self.per_slice = any(s.per_slice for s in sinks)
        self.stats = {}
        self.progress = progress

    def slice_stats(self, z):
        if z not in self.stats:
            self.stats = {z: self.source.stats(z)}  # slices go in order: one slice's statistics at a time
        return self.stats[z]

    def run(self, blocks):
        todo = [b for b in blocks if b not in self.journal.finished]
        self.remaining = {}  # z -> blocks of slice z not yet written
        for b in todo:
            self.remaining.setdefault(b.z, set()).add(b)
        self.arrived = {}
        total = sum(map(block_pixels, blocks))
        progress = Progress(total, total - sum(map(block_pixels, todo))) if self.progress else None
        restarts = 0
        queue = list(reversed(todo))
        try:
            while queue:
                try:
                    self.drain(queue, progress)
                except BrokenProcessPool:
                    restarts += 1
                    if restarts > POOL_RESTARTS:
                        raise DataError(
                            f"a prediction worker died {restarts} times (killed, or out of memory: try a smaller "
                            "--max_memory or fewer --workers); the finished blocks are kept: run the same command "
                            "again to continue"
                        ) from None
                    warn("a prediction worker died (killed, or out of memory); its blocks are redone")
                    self.executor.restart()
                    queue = [b for b in reversed(todo) if b not in self.journal.finished and b not in self.written]
        except MemoryError:  # the machine had less than --max_memory free: one line, the finished blocks kept
            raise DataError(
                f"out of memory after {len(self.journal.finished)} of {len(blocks)} blocks; pass a smaller "
                "--max_memory or fewer --workers (a run with the same blocks continues from the finished ones)"
            ) from None
        except (KeyboardInterrupt, Terminated) as stop:  # SIGTERM raises Terminated (isbi_unet/process)
            done, count = len(self.journal.finished), len(blocks)
            print(f"stopped with {done} of {count} blocks finished: the same command continues the run", flush=True)
            if isinstance(stop, Terminated):
                raise
            raise Interrupted("interrupted") from None
        finally:  # the workers are stopped on the way out, however the run ends
            self.executor.close()
            for sink in self.sinks:
                sink.close()
            if progress:
                progress.close()

    @property
    def written(self):
        return {b for blocks in self.arrived.values() for b in blocks}

    def drain(self, queue, progress):
        """Submits blocks from `queue` (at most 2 x workers in flight, and at most max_in_flight) and writes results
        until it is empty."""
        in_flight = {}
        limit = min(2 * self.executor.workers, self.max_in_flight or 2 * self.executor.workers)
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                block = queue.pop()
                window, core = read_block_window(self.source, block, self.slice_stats(block.z))
                in_flight[self.executor.submit(forward_window, self.spec, window, core)] = block
                del window
            for future in self.executor.done(list(in_flight)):
                block = in_flight.pop(future)
                self.finish(block, future.result())
                if progress:
                    progress.update(block_pixels(block))

    def finish(self, block, prob):
        for sink in self.sinks:
            sink.write(block, prob)
        if not self.per_slice:
            self.journal.add([block])
            self.end_slice_if_complete(block)
            return
        self.arrived.setdefault(block.z, []).append(block)
        self.end_slice_if_complete(block)

    def end_slice_if_complete(self, block):
        remaining = self.remaining[block.z]
        remaining.discard(block)
        if remaining:
            return
        for sink in self.sinks:
            sink.end_slice(block.z)
        if self.per_slice:
            self.journal.add(self.arrived.pop(block.z))


def run_blocks(source, blocks, spec, sinks, executor, journal, progress=True, max_in_flight=None):
    """Predicts every block of `blocks` not yet in `journal` into `sinks`; see Engine."""
    Engine(source, spec, sinks, executor, journal, progress, max_in_flight).run(blocks)


# ---------------------------------------------------------------------------------------------------- a prediction run

GB = 1e9
PNG_PIXELS = 8192 * 8192  # slices up to this size also get NAME.png and prob/NAME.png (two uint8 maps held per slice)
SUBMISSION_BYTES = 2**32 - 2**25  # the float32 ISBI submission stack only while it fits a classic TIFF (4 GB)
STACKS = ("prob.tif", "mask.tif")

# Peak memory of a forward pass per window pixel, measured with tools/block_memory.py at width 16 (docs/volumes.md):
# OneFlow's eager CPU convolutions unfold their input (im2col), hence its 4x ONNX Runtime's. Wider models scale.
# OpenVINO peaked below ONNX Runtime (on top of a 64-px warm-up pass, 1024 and 2048 px windows: ONNX Runtime 532,
# OpenVINO f32 380, bf16 201 bytes per pixel), so ONNX Runtime's figure covers it.
FORWARD_BYTES_PER_PIXEL = {"OneFlow": 2530, "ONNX Runtime": 580, "OpenVINO": 580}
WIDTH_MEASURED = 16
PROCESS_BYTES = 0.37 * GB  # the parent before its first window: Python, OneFlow's import, the model
# A pool worker: the same (a spawned worker imports the script, and so OneFlow) and about 130 MB more, from the
# peaks measured with 2 workers (benchmark.py --volume: 2.3 GB for ONNX, 2.7 GB for OneFlow at 2.5 GB).
WORKER_BYTES = 0.5 * GB
# A model's weights, held by each process that runs it: 7.8 MB of float32 at width 16, growing with width squared;
# ONNX Runtime held 2.5 times them once loaded (tools/block_memory.py: 91, 155 and 389 MB at widths 16, 32 and 64),
# OneFlow less. PROCESS_BYTES and WORKER_BYTES were measured at width 16.
WEIGHT_BYTES_16 = 7.8e6
WEIGHT_COPIES = 2.5


def model_bytes(width):
    """What a process holds for a model of `width` beyond what the width-16 model measured above it held."""
    return WEIGHT_COPIES * WEIGHT_BYTES_16 * max(0.0, (width / WIDTH_MEASURED) ** 2 - 1)


# The parent per pixel of its largest slice: two slices read (1 B each) and their PNG maps (2 B each), and what
# the 8192x8192 section's measured peak showed beyond the estimate (2.69 GB measured, 2.24 GB estimated).
SLICE_BYTES_PER_PIXEL = 8


def forward_bytes_per_pixel(runtimes, width, tta):
    """Bytes per window pixel of one forward pass for the models' runtimes at their width (activations grow with
    the channels), the largest of the ensemble's (members run one after another); TTA keeps a float64 sum."""
    per = max(FORWARD_BYTES_PER_PIXEL[r] for r in runtimes) * max(1.0, width / WIDTH_MEASURED)
    return per + (16 if tta else 0)


def memory_plan(max_memory_gb, workers, runtimes, width, tta, shapes):
    """(bytes left for windows, bytes per window pixel over all processes, the largest padded slice's pixels)
    under --max_memory, all processes together."""
    largest = max(shapes, key=lambda s: s[0] * s[1])
    pool = workers if workers > 1 else 0  # one worker runs in the parent
    fixed = PROCESS_BYTES + pool * WORKER_BYTES + SLICE_BYTES_PER_PIXEL * largest[0] * largest[1]
    fixed += (1 + pool) * model_bytes(width)
    # each process in flight runs one forward; the parent holds two float32 windows and results per worker
    per = workers * (forward_bytes_per_pixel(runtimes, width, tta) + 16)
    hp, wp = padded_shape(largest)
    return max_memory_gb * GB - fixed, per, hp * wp


def choose_side(max_memory_gb, tile, workers, runtimes, width, tta, shapes):
    """The block core side: --tile checked against --max_memory, or the largest that fits it (a whole slice per
    block where its window fits); one line when the budget cannot hold even a 16-px block or the asked tile."""
    left, per, whole = memory_plan(max_memory_gb, workers, runtimes, width, tta, shapes)
    largest = max(max(padded_shape(s)) for s in shapes)
    if tile:
        need = min(window_pixels(tile), whole) * per
        if need > left:
            raise DataError(
                f"--tile {tile} needs about {(max_memory_gb * GB - left + need) / GB:.1f} GB with {workers} "
                f"process(es), more than --max_memory {max_memory_gb:g}; pass a smaller --tile (or none: it is then "
                "chosen from --max_memory)"
            )
        return min(tile, largest)
    if whole * per <= left:
        return largest
    side = block_side(left, per, None, HALO)
    if side < POOL:
        floor = (max_memory_gb * GB - left + window_pixels(POOL) * per) / GB
        raise DataError(
            f"--max_memory {max_memory_gb:g} GB is too small for {workers} process(es) of this model and these "
            f"slices: they need at least about {floor:.1f} GB (fewer --workers need less)"
        )
    return side


def windows_in_flight(max_memory_gb, side, shapes):
    """How many blocks this process may keep in flight when it only reads and writes them (a Dask cluster runs the
    forward passes): a float32 window and its float32 result each, within --max_memory beside the process and
    its slices. The cluster's scheduler holds the same windows until their tasks end."""
    largest = max(shapes, key=lambda s: s[0] * s[1])
    left = max_memory_gb * GB - PROCESS_BYTES - SLICE_BYTES_PER_PIXEL * largest[0] * largest[1]
    hp, wp = padded_shape(largest)
    per_block = 4 * (min(window_pixels(side), hp * wp) + min(side * side, largest[0] * largest[1]))
    return max(1, int(left // per_block))


def check_sizes(source):
    """Every slice has a size four poolings can take; returns the slices' (H, W)."""
    shapes = [source.shape(z) for z in range(len(source.names))]
    for z, shape in enumerate(shapes):
        if min(shape) < POOL:
            raise DataError(f"{source.describe(z)}: smaller than {POOL} pixels, too small for four poolings")
    return shapes


def fingerprint(source, checkpoints, settings):
    """What a stopped run's blocks depend on: the models' bytes, the input's files, the settings (JSON-plain)."""
    models = [file_digest(c) for c in checkpoints]
    return json.loads(json.dumps({"models": models, "input": input_identity(source), "settings": settings}))


def begin_output(out, outputs, print_line, **fields):
    """The run's start in its claimed folder `out` (isbi_unet/outputs.py's rules): a stopped run of the same
    fingerprint there is continued (its Journal comes back with the finished blocks, its files kept), anything
    else of this script's is removed as a whole; the record, unfinished, lists what this run writes."""
    folder = out.folder
    record, path = out.earlier_record(), os.path.join(folder, JOURNAL)
    same = record is not None and record.get("finished") is False and record.get("fingerprint") == fields["fingerprint"]
    files = [n for n in outputs if not n.endswith(".png")]  # made whole at the start
    if same and os.path.isfile(path) and all(os.path.exists(os.path.join(folder, n)) for n in files):
        journal = Journal(path, fields["fingerprint"])
        if journal.finished:
            out.start(writes=[*outputs, JOURNAL], keep_stopped=True, **fields)
            print_line(f"continuing the stopped run in {folder}: {len(journal.finished)} blocks already finished")
            return journal, True
    if record is not None and record.get("finished") is False:
        print_line(f"the stopped run in {folder} had another model, input or settings: starting over")
    out.start(writes=[*outputs, JOURNAL], **fields)
    return Journal(path, fields["fingerprint"]), False


def end_output(folder, journal):
    """The journal goes once every block is written (the final record, written next, no longer lists it)."""
    os.remove(journal.path)


def png_sinks(folder, source, out_names, shapes, threshold, resume):
    return [PngSink(folder, out_names, shapes, threshold)]


def stack_sinks(folder, source, out_names, shapes, threshold, resume):
    zhw, (prob, mask) = (len(shapes), *shapes[0]), (os.path.join(folder, n) for n in STACKS)
    return [
        TiffSink(prob, zhw, np.uint8, to_prob_8, resume),
        TiffSink(mask, zhw, np.uint8, functools.partial(to_mask, threshold=threshold), resume),
    ]


def submission_sinks(folder, source, out_names, shapes, threshold, resume):
    clip = functools.partial(np.clip, a_min=0.0, a_max=1.0)
    return [TiffSink(os.path.join(folder, "submission.tif"), (len(shapes), *shapes[0]), np.float32, clip, resume)]


def omezarr_outputs(source, shapes):
    return list(OMEZARR_OUTPUTS) if isinstance(source, OmeZarrSource) else []


def omezarr_sinks(folder, source, out_names, shapes, threshold, resume):
    """prob.ome.zarr and mask.ome.zarr, shaped, chunked and scaled like the OME-Zarr input (isbi_unet/omezarr.py)."""
    prob, mask = (os.path.join(folder, n) for n in OMEZARR_OUTPUTS)
    return [
        OmeZarrSink(prob, source, to_prob_8, "prob", resume),
        OmeZarrSink(mask, source, functools.partial(to_mask, threshold=threshold), "mask", resume),
    ]


# Other outputs register here: (names(source, shapes) -> names it writes or [], make(folder, source, out_names,
# shapes, threshold, resume) -> sinks). A registered output stands in for the PNGs and prob/mask stacks.
OUTPUTS = [(omezarr_outputs, omezarr_sinks)]


def output_plan(source, out_names, shapes):
    """[(names, make)]: the registered outputs that apply (OME-Zarr maps for an OME-Zarr input); else per-slice
    PNGs where slices are small enough, and for a stack input (or slices too big for PNGs) prob.tif and mask.tif;
    the float32 submission.tif where all slices share a size and it fits a classic TIFF."""
    registered = [(names(source, shapes), make) for names, make in OUTPUTS if names(source, shapes)]
    plan = []
    if not registered and all(h * w <= PNG_PIXELS for h, w in shapes):
        plan.append(([*out_names, *(f"{PROB_DIR}/{name}" for name in out_names)], png_sinks))
    if len(set(shapes)) == 1:
        if not (plan or registered) or is_stack(source.path):
            plan.append((list(STACKS), stack_sinks))
        if len(shapes) * shapes[0][0] * shapes[0][1] * 4 <= SUBMISSION_BYTES:
            plan.append((["submission.tif"], submission_sinks))
    return registered + plan


def planned_outputs(source, out_names, shapes):
    """The names the run writes in its folder, known before anything is made (for the record)."""
    return [name for names, _ in output_plan(source, out_names, shapes) for name in names]


def make_sinks(folder, source, out_names, shapes, threshold, scores, resume):
    """Every output's sinks (files made, or reopened to continue), and the maps in memory when scores are asked."""
    sinks = [
        s
        for _, make in output_plan(source, out_names, shapes)
        for s in make(folder, source, out_names, shapes, threshold, resume)
    ]
    return sinks + ([ArraySink(shapes)] if scores else [])
