"""ONNX Runtime inference of a model written by export_onnx.py; needs onnxruntime, not OneFlow.

    session, state = load_onnx("unet.onnx")      # checked: readable, this repo's metadata, 1 input channel
    session, state = load_onnx("model.zip")      # the same, from a bioimage.io package (isbi_unet/bioimageio.py)
    forward = onnx_forward(session)              # numpy Nx1xHxW -> probabilities, for tiling.predict_tiled

The file alone is enough to predict: export_onnx.py stores the model config, the traced size and the
preprocessing in its metadata_props (METADATA keys below). Its batch, height and width are free. Files
exported before that have a fixed 1x1xSxS input; for them state has "input_size" S, and inputs of another
size are tiled at S (fixed_tile).
"""

import contextlib
import io
import json
import os

import numpy as np

from isbi_unet.errors import DataError
from isbi_unet.formats import ONNX_FORMAT as FORMAT
from isbi_unet.formats import POOL, round_up

# metadata_props keys; values are strings, the JSON ones parsed by load_onnx
KEY_FORMAT, KEY_CONFIG, KEY_SIZE, KEY_PREPROCESS, KEY_OUTPUT, KEY_EPOCH, KEY_SOURCE = (
    "isbi_unet.format",
    "isbi_unet.model_config",
    "isbi_unet.input_size",
    "isbi_unet.preprocess",
    "isbi_unet.output",
    "isbi_unet.epoch",
    "isbi_unet.source_checkpoint",
)
PREPROCESS = "uint8 slice / 255, then (x - mean) / max(std, 1e-6) over the whole slice (isbi_unet.images.preprocess)"
OUTPUT = "cell probability in [0, 1] (sigmoid included), the input's shape"
INSTALL = "pip install -r requirements-onnx.txt (CPython 3.10+), or `source setup.sh`"
BIOIMAGEIO_INSTALL = "pip install -r requirements-bioimageio.txt (CPython 3.10+), or `source setup.sh`"


def is_package(path):
    return str(path).lower().endswith(".zip")


def is_onnx(path):
    """Whether `path` names a model ONNX Runtime runs: an .onnx file, or a bioimage.io package (.zip) holding one."""
    return str(path).lower().endswith(".onnx") or is_package(path)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DataError(f"ONNX models need onnxruntime, which is not installed: {INSTALL}") from None
    return onnxruntime


def open_session(path, threads=None, model=None):
    """An ONNX Runtime CPU session for `path` (or for the bytes `model` read from it); unreadable is one DataError."""
    ort = import_onnxruntime()
    if model is None and not os.path.isfile(path):
        raise DataError(f"{path}: no such ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if threads:
        options.intra_op_num_threads = threads
    # Spinning threads wait faster on an idle machine but lose a third of the speed on a busy one (measured).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # A memory pattern is planned and kept per input shape; blocks at image borders have shapes of their own, and the
    # patterns added up: width-64 blocks of 800 px peaked at 3.7 GB with them, 1.7 GB without (96 s instead of 93 s).
    options.enable_mem_pattern = False
    try:
        return ort.InferenceSession(path if model is None else model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own types for truncated or foreign files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: unreadable ONNX model, truncated or corrupt ({detail})") from None


def read_state(path, session):
    """The checkpoint-like dict (format, model_config, export_size, epoch) from the model's metadata."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(KEY_FORMAT) != FORMAT:
        raise DataError(f"{path}: not an export of this repo (no '{FORMAT}' metadata); make one with export_onnx.py")
    try:
        state = {
            "format": FORMAT,
            "model_config": json.loads(meta[KEY_CONFIG]),
            "export_size": int(meta[KEY_SIZE]),
            "epoch": json.loads(meta.get(KEY_EPOCH, "null")),
        }
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: damaged isbi_unet metadata ({type(e).__name__}: {e})") from None
    return state


def is_free(dim):
    return not isinstance(dim, int)  # ONNX Runtime gives a named (symbolic) dimension as a string, or None


def check_inputs(path, session, state):
    """One Nx1xHxW float input and one output; a fixed H and W must be the metadata's size (state gets
    "input_size" then, which makes prediction tile at it)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
        raise DataError(f"{path}: expected one 4-D input and one output, got {len(inputs)} and {len(outputs)}")
    shape = inputs[0].shape
    if shape[1] != 1 or state["model_config"].get("n_channels", 1) != 1:
        raise DataError(f"{path}: the model takes {shape[1]} input channels; EM slices have 1 (greyscale)")
    if is_free(shape[2]) and is_free(shape[3]):
        return
    size = state["export_size"]
    if list(shape[2:]) != [size, size]:
        raise DataError(f"{path}: input shape {shape} does not match its metadata's size {size}")
    state["input_size"] = size


def load_onnx(path, threads=None):
    """(session, state) for an export_onnx.py file or a package holding one, checked; state mimics a
    checkpoint for run.json."""
    model = None
    if is_package(path):
        model = read_package(path)
    session = open_session(path, threads, model)
    state = read_state(path, session)
    check_inputs(path, session, state)
    return session, state


def onnx_forward(session):
    """numpy Nx1xHxW float32 -> probabilities of the same shape; one slice at a time where the batch is fixed."""
    name = session.get_inputs()[0].name
    free_batch = is_free(session.get_inputs()[0].shape[0])

    def forward(batch):
        batch = np.asarray(batch, np.float32)
        if free_batch:
            return session.run(None, {name: batch})[0]
        return np.concatenate([session.run(None, {name: x[None]})[0] for x in batch])

    return forward


def fixed_tile(shape, size, tile=0):
    """The --tile an ONNX model of input size `size` needs for an image of `shape` (HxW or 1xHxW).

    A requested `tile` must be `size`; without one: 0 (one pass) when the image, padded to a multiple of 16,
    is exactly size x size, else `size`.
    """
    if tile and tile != size:
        raise DataError(f"--tile {tile}: the ONNX model takes {size}x{size} inputs only; pass --tile {size} or none")
    if tile:
        return tile
    h, w = shape[-2:]
    return 0 if round_up(h, POOL) == size and round_up(w, POOL) == size else size


def import_core():
    """bioimageio.core and .spec, or one DataError naming the install command."""
    os.environ.setdefault("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")  # no URL look-ups: offline is the usual case
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise DataError(
            f"bioimage.io packages need bioimageio.core, which is not installed: {BIOIMAGEIO_INSTALL}"
        ) from None


def read_package(path):
    """The ONNX weights (bytes) of a package, checked to take the preprocessing images.preprocess does."""
    import_core()
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such bioimage.io package")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            descr = load_model_description(path, perform_io_checks=False)
    except Exception as e:  # not a zip, no rdf.yaml, an invalid description: all one line
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{path}: not a readable bioimage.io model package ({detail})") from None
    if not isinstance(descr, v0_5.ModelDescr) or descr.weights.onnx is None:
        raise DataError(f"{path}: a bioimage.io package without ONNX weights; export one with export_onnx.py")
    steps = [p.id for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"]
    if steps != ["zero_mean_unit_variance"]:
        raise DataError(f"{path}: preprocessing {steps} is not this repo's (zero_mean_unit_variance over y, x)")
    try:
        return descr.weights.onnx.get_reader().read()
    except Exception as e:  # a weights file missing from the zip, say
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{path}: its ONNX weights cannot be read ({detail})") from None
