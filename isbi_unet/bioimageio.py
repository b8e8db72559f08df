"""bioimage.io model packages (format 0.5) of an export_onnx.py model (onnx_backend.read_package reads them back).

    write_package("isbi-membrane-unet.zip", "weights.onnx", state, "checkpoints/best", image, author)

A package is a zip of rdf.yaml (the description), the size-free ONNX weights, a real slice as test input
with the model's own output for it, a cover and a README; Fiji (deepImageJ), napari and ilastik open it
(docs/bioimageio.md). It is written only after bioimageio.core's test_model passes on it, offline.
Needs requirements-bioimageio.txt (bioimageio.core and its pinned dependencies).
"""

import contextlib
import csv
import os
import shutil
import tempfile

import cv2
import numpy as np
from PIL import Image

from isbi_unet.errors import DataError, atomic_write
from isbi_unet.formats import METRICS as SCORES
from isbi_unet.formats import POOL
from isbi_unet.onnx_backend import import_core, onnx_forward, open_session

DEFAULT_AUTHOR = "isbi-unet maintainers"
LICENSE = "CC-BY-4.0"
# bioimage.io's zero_mean_unit_variance is (x - mean) / (std + eps) on the raw values; images.preprocess is
# (x / 255 - mean) / max(std, 1e-6) on [0, 1]. With eps 1e-6 on the 0-255 scale they differ by a factor
# 1 + 1e-6 / std, under 1e-7 for any slice with contrast.
EPS = 1e-6
# Measured: a 16-aligned tile's probabilities differ from the whole slice's by more than 1/255 up to 42 px
# from the tile's edge (4 tiles of 192-256 px on 2 ISBI test slices; a trained width-8 model). 48 keeps
# the blocks a tool cuts with it on the model's 16-pixel pooling grid; off that grid (tiles at an offset
# of 8) differences reached 101 px from the edge.
HALO = 48
STEP = POOL  # four 2x2 poolings
MIN_SIZE = 2 * HALO + STEP  # bioimage.io requires something left once the halo is cropped from both sides
TAGS = ["segmentation", "2d", "electron-microscopy", "membrane", "unet", "isbi2012", "onnx"]
CITATIONS = [
    ("Ronneberger, Fischer and Brox: U-Net, MICCAI 2015", "10.1007/978-3-319-24574-4_28"),
    ("Arganda-Carreras et al.: the ISBI 2012 challenge, Front. Neuroanat. 2015", "10.3389/fnana.2015.00142"),
]


def held_out_scores(checkpoint, epoch):
    """{"V_rand": ..., ...} from log.csv beside the checkpoint, at its epoch; {} without one."""
    log = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.csv")
    with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError):
        with open(log, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("epoch") == str(epoch):
                    return {name: row[key] for key, name in SCORES.items() if row.get(key)}
    return {}


def documentation(state, checkpoint):
    """The package's README: what it does, how it was trained and scored, how to use it, its limits."""
    args = state.get("run_args") or {}
    recipe = ", ".join(
        f"{k} {args[k]}"
        for k in ("epochs", "batch_size", "lr", "crop_size", "samples_per_slice", "loss", "elastic_sigma", "seed")
        if k in args
    )
    scores = held_out_scores(checkpoint, state.get("epoch"))
    held_out = (
        ", ".join(f"{name} {value}" for name, value in scores.items())
        + f" on the {args.get('val_slices', '?')} held-out training slices (higher V_rand and V_info, lower pixel"
        " error is better)"
        if scores
        else "not recorded (no log.csv beside the checkpoint)"
    )
    return f"""# U-Net for cell membranes in electron microscopy (ISBI 2012)

Segments cell membranes in 2D serial-section electron microscopy: for each pixel it gives the probability
that the pixel is inside a cell (1) rather than on a membrane (0). Threshold at 0.5 for a mask.

## Training
- Data: the ISBI 2012 EM segmentation challenge training stack (30 slices of 512x512 px, Drosophila
  first instar larva ventral nerve cord, serial-section TEM, 4x4x50 nm voxels), labels 255 = cell, 0 = membrane.
- Model: U-Net (Ronneberger et al. 2015), UNet{state["model_config"]}, trained in OneFlow, epoch {state.get("epoch")}.
- Recipe: {recipe or "not recorded"}.
- Held-out scores: {held_out}.

## Use
- Input: one grey EM slice; the network takes any height and width that are multiples of {STEP}, and the
  package declares {MIN_SIZE} + k x {STEP} (tools pad or tile; tiles keep a halo of {HALO} px). Each image
  is normalised to zero mean and unit variance first (the package says so; the tools do it).
- Fiji: install deepImageJ, then DeepImageJ Install Model -> from a zip file; run it with DeepImageJ Run.
- napari / Python: `bioimageio.core.predict(model="this.zip", inputs=image)`, or the napari-bioimageio plugin.
- ilastik: this package has ONNX weights only; ilastik's Neural Network workflow runs PyTorch weights.

## Limits
- Trained on one anisotropic TEM stack of one tissue; other microscopes, resolutions or stains need
  retraining or at least checking against a few hand-labelled slices.
- Output is a probability per pixel, not instances: cells are the connected regions of the thresholded
  mask, and a gap of one pixel in a membrane merges two cells.
"""


def cover(image, prob, path):
    """The slice beside its overlay (predicted membrane in magenta), 2:1 as bioimage.io shows covers."""
    from isbi_unet.figures import overlay

    mask = np.where(prob >= 0.5, 255, 0).astype(np.uint8)
    pair = np.concatenate([cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), overlay(image, mask)], axis=1)
    scale = 256 / pair.shape[0]
    pair = cv2.resize(pair, (round(pair.shape[1] * scale), 256), interpolation=cv2.INTER_AREA)
    # 256 colours: a noisy EM slice in full colour makes a PNG several times larger for no visible gain
    Image.fromarray(pair[:, :, ::-1]).quantize(256).save(path, optimize=True)


def test_input(image):
    """The slice cropped (or mirrored, when smaller) to the nearest size the package declares, MIN_SIZE + k x STEP."""
    size = [MIN_SIZE + max(0, n - MIN_SIZE) // STEP * STEP for n in image.shape]
    image = np.pad(image, [(0, max(0, s - n)) for s, n in zip(size, image.shape)], mode="symmetric")
    return np.ascontiguousarray(image[: size[0], : size[1]])


def test_output(onnx_path, image):
    """The model's own probabilities for the test slice, preprocessed as the package describes."""
    x = image.astype(np.float32)
    x = (x - x.mean()) / (x.std() + EPS)
    return onnx_forward(open_session(onnx_path))(x[None, None])


def describe(folder, state, author):
    """The ModelDescr of the files in `folder` (weights.onnx, test_input.npy, test_output.npy, cover.png, README.md)."""
    from bioimageio.spec.model import v0_5 as m

    def file(name):
        return os.path.join(folder, name)

    space = [m.SpaceInputAxis(id=m.AxisId(a), size=m.ParameterizedSize(min=MIN_SIZE, step=STEP)) for a in "yx"]
    raw = m.InputTensorDescr(
        id=m.TensorId("raw"),
        description="a grey EM slice (uint8 values as float32 are fine: it is standardised first)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")]), *space],
        test_tensor=m.FileDescr(source=file("test_input.npy")),
        data=m.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            m.ZeroMeanUnitVarianceDescr(
                kwargs=m.ZeroMeanUnitVarianceKwargs(axes=[m.AxisId("y"), m.AxisId("x")], eps=EPS)
            )
        ],
    )
    out_space = [
        m.SpaceOutputAxisWithHalo(
            id=m.AxisId(a), size=m.SizeReference(tensor_id=m.TensorId("raw"), axis_id=m.AxisId(a)), halo=HALO
        )
        for a in "yx"
    ]
    prob = m.OutputTensorDescr(
        id=m.TensorId("cell_probability"),
        description="probability that the pixel lies inside a cell (1) rather than on a membrane (0)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("cell")]), *out_space],
        test_tensor=m.FileDescr(source=file("test_output.npy")),
        data=m.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    import onnx

    opset = max(op.version for op in onnx.load(file("weights.onnx")).opset_import if op.domain in ("", "ai.onnx"))
    width = state["model_config"]["width"]
    return m.ModelDescr(
        name="ISBI 2012 membrane U-Net",
        description=f"U-Net (width {width}) giving the cell probability of 2D EM slices; membranes are low",
        authors=[m.Author(name=author)],
        cite=[m.CiteEntry(text=text, doi=m.Doi(doi)) for text, doi in CITATIONS],
        license=m.LicenseId(LICENSE),
        documentation=m.FileDescr(source=file("README.md")),
        covers=[m.FileDescr(source=file("cover.png"))],
        tags=TAGS,
        inputs=[raw],
        outputs=[prob],
        weights=m.WeightsDescr(onnx=m.OnnxWeightsDescr(source=file("weights.onnx"), opset_version=opset)),
        config=m.Config(
            bioimageio=m.BioimageioConfig(
                architecture_type="U-Net",
                modality="electron microscopy",
                target_structure=["cell membrane"],
                task="semantic segmentation",
            ),
            deepimagej={"pyramidal_model": False, "allow_tiling": True, "model_keys": None},
        ),
    )


def first_failure(summary):
    """The first failed check of a bioimageio ValidationSummary, its first sentence on one line."""
    for detail in summary.details:
        if detail.status == "failed":
            errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" if e.loc else e.msg for e in detail.errors]
            text = " ".join(f"{detail.name}: {errors[0] if errors else 'failed'}".split())
            return text.split(". ")[0]
    return summary.status


def write_package(path, onnx_path, state, checkpoint, image, author=DEFAULT_AUTHOR):
    """Builds the package of `onnx_path` in a temporary folder, tests it with bioimageio.core's test_model,
    and only then writes `path`; any failure is one DataError and no file."""
    import_core()
    from bioimageio.core import test_model
    from bioimageio.spec import save_bioimageio_package

    image = test_input(image)
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(onnx_path, os.path.join(folder, "weights.onnx"))
        prob = test_output(onnx_path, image)
        np.save(os.path.join(folder, "test_input.npy"), image.astype(np.float32)[None, None])
        np.save(os.path.join(folder, "test_output.npy"), prob)
        cover(image, prob[0, 0], os.path.join(folder, "cover.png"))
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(documentation(state, checkpoint))
        try:
            descr = describe(folder, state, author)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            detail = " ".join(str(e).split())[:400]
            raise DataError(f"{path}: not written, the description is invalid ({detail})") from None
        summary = test_model(descr)
        if summary.status != "passed":
            raise DataError(f"{path}: not written, bioimageio.core's test failed: {first_failure(summary)}")
        with atomic_write(path, "the bioimage.io package") as tmp:
            save_bioimageio_package(descr, output_path=tmp)
