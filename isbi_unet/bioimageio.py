"""bioimage.io model packages (format 0.5) of an export_onnx.py model (onnx_backend.read_package reads them back).

    write_package("isbi-membrane-unet.zip", "weights.onnx", state, "checkpoints/best", image, meta, reference,
                  arrays, torch_python)

A package is a zip of rdf.yaml (the description), the weights, a real slice as test input with the OneFlow
checkpoint's own output for it, sample tensors, a cover and a README. Its weights are the size-free ONNX file
(deepImageJ, bioimageio.core) and, when a Python with PyTorch is given (`bash setup.sh --torch` makes one),
pytorch_state_dict (isbi_unet/unet_torch.py as the architecture, the checkpoint's tensors loaded with
strict=True) and torchscript (its torch.jit.script), which ilastik, QuPath and BiaPy need. The halo is measured
on the check slice for the model at hand (tiles against the whole slice, isbi_unet/package_worker.py's
tolerance). It is written only after bioimageio.core's test_model passes for every weight format, offline, and
a blockwise prediction of the test input equals the whole one away from the image border (docs/bioimageio.md).
Needs requirements-bioimageio.txt (bioimageio.core and its pinned dependencies).
"""

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import cv2
import numpy as np
from PIL import Image

from isbi_unet import package_worker as worker
from isbi_unet.errors import DataError, atomic_write
from isbi_unet.formats import METRICS as SCORES
from isbi_unet.formats import POOL
from isbi_unet.onnx_backend import import_core, onnx_forward, open_session

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "package_worker.py")
TWIN = os.path.join(HERE, "unet_torch.py")
# The side venv `bash setup.sh --torch` makes; used when --torch_python is not given and it exists.
TORCH_VENV_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-torch", "bin", "python")
NO_TORCH = "none"  # --torch_python none: the ONNX weights only
ADD_TORCH = "bash setup.sh --torch (or --torch_python PATH to a Python with torch and bioimageio.core)"
# The repo's code is MIT (LICENSE); the weights, trained by this code, carry the same licence.
LICENSE = "MIT"
# bioimage.io's zero_mean_unit_variance is (x - mean) / (std + eps) on the raw values; images.preprocess is
# (x / 255 - mean) / max(std, 1e-6) on [0, 1]. With eps 1e-6 on the 0-255 scale they differ by a factor
# 1 + 1e-6 / std, under 1e-7 for any slice with contrast.
EPS = 1e-6
STEP = POOL  # four 2x2 poolings
# Halos tried, smallest first: tiles of a 16-aligned halo keep the network's 16-pixel pooling grid. Measured
# on ISBI test slices with a trained width-16 model: 32 px 0.20, 48 0.086, 64 0.029, 80 0.0008, 96 exactly 0.
HALOS = range(STEP, 12 * STEP + 1, STEP)
TOLERANCE = worker.TILE_TOLERANCE  # tiles against the whole slice, and every weight format against OneFlow
TORCH_FORMATS = ("pytorch_state_dict", "torchscript")
# deepImageJ's basic install runs ONNX Runtime with opset 17 at most (IR version 8); the export's opset 11 maps
# to its oldest engine too.
MAX_OPSET = 17
TAGS = ["segmentation", "2d", "electron-microscopy", "membrane", "unet", "isbi2012", "onnx"]
CITATIONS = [
    ("Ronneberger, Fischer and Brox: U-Net, MICCAI 2015", "10.1007/978-3-319-24574-4_28"),
    ("Arganda-Carreras et al.: the ISBI 2012 challenge, Front. Neuroanat. 2015", "10.3389/fnana.2015.00142"),
]
DATA_CITATIONS = [
    CITATIONS[1],
    ("Cardona et al.: the Drosophila larva serial-section TEM stack, PLoS Biol. 2010", "10.1371/journal.pbio.1000502"),
]
# who imaged the stack (Cardona et al. 2010) and who made it the challenge (Arganda-Carreras et al. 2015)
DATA_AUTHORS = ["Albert Cardona", "Ignacio Arganda-Carreras"]
DATA_URL = "https://imagej.net/events/isbi-2012-segmentation-challenge"


def min_size(halo):
    """bioimage.io's rule: something must be left once the halo is cut from both sides; on the 16-px step."""
    return 2 * halo + STEP


def block_size(size, halo):
    """The input blocks of the tiled test: inner blocks of about a quarter of the slice (16-aligned), plus
    the halo on both sides; always a size the package declares (min_size(halo) + k x STEP)."""
    return max(STEP, size // 4 // STEP * STEP) + 2 * halo


def standardise(image):
    """The package's preprocessing (zero_mean_unit_variance over the whole slice) in NumPy: the model's input."""
    x = image.astype(np.float32)
    return (x - x.mean()) / (x.std() + EPS)


def tiled(forward, x, halo, block):
    """`forward` of the standardised slice `x` (HxW, multiples of 16) in blocks as bioimageio.core cuts them:
    inner blocks of block - 2 x halo, each predicted with `halo` px of context (mirrored beyond the border)."""
    inner = block - 2 * halo
    padded = np.pad(x, halo, mode="symmetric")
    out = np.empty_like(x)
    starts = [[min(p, n - inner) for p in range(0, n, inner)] for n in x.shape]
    for y in starts[0]:
        for x0 in starts[1]:
            tile = padded[y : y + block, x0 : x0 + block]
            out[y : y + inner, x0 : x0 + inner] = forward(tile[None, None])[0, 0, halo:-halo, halo:-halo]
    return out


def seam_difference(forward, x, whole, halo):
    """Largest |tiled - whole| more than `halo` px from the border of `x` (where tools pad the image themselves)."""
    got = tiled(forward, x, halo, block_size(min(x.shape), halo))
    inner = (slice(halo, -halo), slice(halo, -halo))
    return float(np.abs(got[inner] - whole[inner]).max())


def measure_halo(forward, image):
    """(halo, {halo: difference}): the smallest 16-aligned halo whose tiles equal the whole slice within
    TOLERANCE, measured on `image` cut to a multiple of 16; DataError when the slice is too small to tell."""
    x = standardise(image[: image.shape[0] // STEP * STEP, : image.shape[1] // STEP * STEP])
    whole = forward(x[None, None])[0, 0]
    measured = {}
    for halo in HALOS:
        if min(x.shape) < 2 * halo + 2 * STEP:  # nothing left to compare once the border band is cut
            break
        measured[halo] = seam_difference(forward, x, whole, halo)
        if measured[halo] <= TOLERANCE:
            return halo, measured
    tried = ", ".join(f"{h} px {d:.4f}" for h, d in measured.items()) or "none fit"
    raise DataError(
        f"the check slice ({image.shape[0]}x{image.shape[1]}) cannot show a halo whose tiles agree with the whole "
        f"slice within {TOLERANCE:.4f} (tried {tried}); pass a larger --check_data slice"
    )


def held_out_scores(checkpoint, epoch):
    """{"V_rand": ..., ...} from log.csv beside the checkpoint, at its epoch; {} without one."""
    log = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.csv")
    with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError):
        with open(log, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("epoch") == str(epoch):
                    return {name: row[key] for key, name in SCORES.items() if row.get(key)}
    return {}


def documentation(state, checkpoint, halo, formats):
    """The package's README: what it does, how it was trained and scored, how to run it, its limits."""
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
    size = min_size(halo)
    torch_note = (
        "- ilastik (Neural Network workflow), QuPath and BiaPy: they load the `pytorch_state_dict` or `torchscript`"
        " weights; open this zip (QuPath: unzip it and open its `rdf.yaml`)."
        if "torchscript" in formats
        else "- ilastik, QuPath and BiaPy need PyTorch weights, which this package lacks (it was exported without a"
        " Python with PyTorch)."
    )
    return f"""# U-Net for cell membranes in electron microscopy (ISBI 2012)

Segments cell membranes in 2D serial-section electron microscopy: for each pixel it gives the probability
that the pixel is inside a cell (1) rather than on a membrane (0). Threshold at 0.5 for a mask.

## Training
- Data: the ISBI 2012 EM segmentation challenge training stack (30 slices of 512x512 px, Drosophila
  first instar larva ventral nerve cord, serial-section TEM, 4x4x50 nm voxels; Cardona et al. 2010,
  Arganda-Carreras et al. 2015), labels 255 = cell, 0 = membrane.
- Model: U-Net (Ronneberger et al. 2015), UNet{state["model_config"]}, trained in OneFlow, epoch {state.get("epoch")}.
- Recipe: {recipe or "not recorded"}.
- Held-out scores: {held_out}.
- Weights: {", ".join(formats)}, all converted from the one OneFlow checkpoint and checked against it.

## Input size, tiles and normalisation
- Input: one grey EM slice, float32 (uint8 values are fine). Height and width must be {size} + k x {STEP}
  px ({size}, {size + STEP}, ..., 512, ...): pad a slice of another size (mirror its edge) up to the next
  such size, and crop the output back.
- Predict large images in blocks and keep the halo of {halo} px: measured for this model, blocks with a
  {halo} px halo agree with the whole slice within 1/255 away from the image border (a smaller halo leaves
  visible seams). In bioimageio.core use blockwise prediction (`blocksize_parameter`, below).
- Each slice is normalised to zero mean and unit variance over the whole slice, as in training
  (`zero_mean_unit_variance`, per sample). bioimageio.core computes these statistics on the whole image
  before it cuts blocks, so tiled and whole predictions agree. A tool that normalised each tile on its
  own would not: there, standardise the whole slice yourself first ((x - mean) / std); the model's own
  normalisation then changes a standardised tile only slightly, and the halo keeps the seams small.

## Use
- Python (a separate environment is fine; Python 3.10+):
  `pip install "bioimageio.core==0.11.0" "pydantic<2.14" onnxruntime torch` (pydantic 2.14 breaks
  bioimageio.spec 0.5.12's `test`, `predict` and `validate-format`), then
  `bioimageio test this.zip`, or in Python
  `bioimageio.core.predict(model="this.zip", inputs=image[None, None], blocksize_parameter=4)`
  (blockwise; without it bioimageio.core pads the whole image by the halo before normalising, which moves
  the probabilities by a few hundredths).
- Fiji: install deepImageJ, then DeepImageJ Install Model -> from a zip file; run it with DeepImageJ Run
  (it uses the `onnx` weights).
{torch_note}

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


def test_input(image, smallest):
    """The slice cropped (or mirrored, when smaller) to the nearest size the package declares, SMALLEST + k x STEP."""
    size = [smallest + max(0, n - smallest) // STEP * STEP for n in image.shape]
    image = np.pad(image, [(0, max(0, s - n)) for s, n in zip(size, image.shape)], mode="symmetric")
    return np.ascontiguousarray(image[: size[0], : size[1]])


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_files(folder, image, expected, readme):
    """Test and sample tensors, cover and README into `folder`."""
    np.save(os.path.join(folder, "test_input.npy"), image.astype(np.float32)[None, None])
    np.save(os.path.join(folder, "test_output.npy"), expected)
    Image.fromarray(image).save(os.path.join(folder, "sample_input.png"))
    Image.fromarray(np.round(expected[0, 0] * 255).astype(np.uint8)).save(os.path.join(folder, "sample_output.png"))
    cover(image, expected[0, 0], os.path.join(folder, "cover.png"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme)


def describe_people(m, curation):
    """(authors, maintainers): every --author, with the --github_user of the same position where given;
    those with a GitHub account maintain the package."""
    users = list(curation.get("github_users") or [])
    people = [(name, users[i] if i < len(users) else None) for i, name in enumerate(curation["authors"])]
    authors = [m.Author(name=name, github_user=user) for name, user in people]
    maintainers = [m.Maintainer(name=name, github_user=user) for name, user in people if user]
    return authors, maintainers


def training_data():
    from bioimageio.spec.dataset.v0_3 import Author, CiteEntry, DatasetDescr, Doi

    return DatasetDescr(
        name="ISBI 2012 EM segmentation challenge",
        authors=[Author(name=name) for name in DATA_AUTHORS],
        description="30 serial-section TEM slices (512x512 px, 4x4x50 nm) of the Drosophila first instar larva "
        "ventral nerve cord with membrane labels, the training stack of the ISBI 2012 challenge.",
        cite=[CiteEntry(text=text, doi=Doi(doi)) for text, doi in DATA_CITATIONS],
        source=DATA_URL,
        tags=["electron-microscopy", "membrane", "isbi2012"],
    )


def describe(folder, state, curation, halo, torch_info):
    """The ModelDescr of the files in `folder`; torch_info ({"torch": version} or None) adds the PyTorch weights."""
    from bioimageio.spec.model import v0_5 as m

    def file(name):
        return m.FileDescr(source=os.path.join(folder, name), sha256=m.Sha256(sha256(os.path.join(folder, name))))

    def path(name):
        return os.path.join(folder, name)

    space = [m.SpaceInputAxis(id=m.AxisId(a), size=m.ParameterizedSize(min=min_size(halo), step=STEP)) for a in "yx"]
    raw = m.InputTensorDescr(
        id=m.TensorId(worker.TENSOR_IN),
        description="a grey EM slice (uint8 values as float32 are fine: it is standardised first)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")]), *space],
        test_tensor=file("test_input.npy"),
        sample_tensor=file("sample_input.png"),
        data=m.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            m.ZeroMeanUnitVarianceDescr(
                kwargs=m.ZeroMeanUnitVarianceKwargs(axes=[m.AxisId("y"), m.AxisId("x")], eps=EPS)
            )
        ],
    )
    out_space = [
        m.SpaceOutputAxisWithHalo(
            id=m.AxisId(a), size=m.SizeReference(tensor_id=m.TensorId(worker.TENSOR_IN), axis_id=m.AxisId(a)), halo=halo
        )
        for a in "yx"
    ]
    prob = m.OutputTensorDescr(
        id=m.TensorId(worker.TENSOR_OUT),
        description="probability that the pixel lies inside a cell (1) rather than on a membrane (0)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("cell")]), *out_space],
        test_tensor=file("test_output.npy"),
        sample_tensor=file("sample_output.png"),
        data=m.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    authors, maintainers = describe_people(m, curation)
    width = state["model_config"]["width"]
    return m.ModelDescr(
        name="ISBI 2012 membrane U-Net",
        description=f"U-Net (width {width}) giving the cell probability of 2D EM slices; membranes are low",
        version=curation["version"],
        authors=authors,
        maintainers=maintainers,
        cite=[m.CiteEntry(text=text, doi=m.Doi(doi)) for text, doi in CITATIONS],
        license=m.LicenseId(LICENSE),
        git_repo=curation.get("git_repo") or None,
        documentation=file("README.md"),
        covers=[file("cover.png")],
        tags=TAGS + (["pytorch", "torchscript"] if torch_info else []),
        training_data=training_data(),
        inputs=[raw],
        outputs=[prob],
        weights=weights(m, folder, state, torch_info, path),
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


def weights(m, folder, state, torch_info, path):
    """ONNX alone, or pytorch_state_dict (the checkpoint's tensors: the root) with torchscript and ONNX beside it."""
    import onnx

    opset = max(op.version for op in onnx.load(path("weights.onnx")).opset_import if op.domain in ("", "ai.onnx"))
    onnx_comment = "converted from the OneFlow checkpoint with oneflow-onnx (pixel shuffles as DepthToSpace)"
    if not torch_info:
        return m.WeightsDescr(
            onnx=m.OnnxWeightsDescr(source=path("weights.onnx"), opset_version=opset, comment=onnx_comment)
        )
    config = state["model_config"]
    kwargs = {k: config[k] for k in ("n_channels", "n_classes", "width")}
    version = m.Version(torch_info["torch"])
    return m.WeightsDescr(
        pytorch_state_dict=m.PytorchStateDictWeightsDescr(
            source=path("weights.pt"),
            architecture=m.ArchitectureFromFileDescr(
                source=path("unet_torch.py"),
                sha256=m.Sha256(sha256(path("unet_torch.py"))),
                callable="UNet",
                kwargs=kwargs,
            ),
            pytorch_version=version,
            comment="the OneFlow checkpoint's tensors under their own names, loaded with strict=True",
        ),
        torchscript=m.TorchscriptWeightsDescr(
            source=path("weights_torchscript.pt"),
            pytorch_version=version,
            parent="pytorch_state_dict",
            comment="torch.jit.script of the pytorch_state_dict model",
        ),
        onnx=m.OnnxWeightsDescr(
            source=path("weights.onnx"),
            opset_version=opset,
            parent="pytorch_state_dict",
            comment=onnx_comment + "; the same tensors as pytorch_state_dict",
        ),
    )


def find_torch_python(flag):
    """The Python to run the PyTorch step in: --torch_python, else .venv-torch if there; None for ONNX only."""
    if flag == NO_TORCH:
        return None
    if flag is None:
        return TORCH_VENV_PYTHON if os.path.exists(TORCH_VENV_PYTHON) else None
    return flag


def check_torch_python(python):
    """One DataError unless `python` runs and imports torch and bioimageio.core (checked before the slow part)."""
    code = "import torch, bioimageio.core; print(torch.__version__)"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise DataError(f"{python}: --torch_python cannot run ({e.strerror}); make one with {ADD_TORCH}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise DataError(f"{python}: not a Python with torch and bioimageio.core ({detail}); make one with {ADD_TORCH}")


def check_twin(config):
    """DataError unless unet_torch.UNet can hold the checkpoint's weights (it has no bilinear upsampling)."""
    if config.get("bilinear"):
        raise DataError(
            f"UNet{config}: bilinear upsampling has no PyTorch twin (isbi_unet/unet_torch.py), so the package cannot "
            f"carry PyTorch weights; export a transposed-convolution model, or pass --torch_python {NO_TORCH}"
        )


def run_worker(python, *args):
    """The parsed JSON line `python package_worker.py ARGS` prints; its one-line error as a DataError."""
    env = {**os.environ, "TQDM_DISABLE": "1"}  # bioimageio.core's progress bar per block
    proc = subprocess.run([python, WORKER, *map(str, args)], capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise DataError(f"{python}: the package's {args[0]} step failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_torch_weights(folder, python, state, arrays, model_input, expected):
    """weights.pt, weights_torchscript.pt and unet_torch.py in `folder`, made by `python`;
    returns {"torch": version, "max_difference": {format: |PyTorch - OneFlow|}}."""
    config = state["model_config"]
    np.savez(os.path.join(folder, "weights.npz"), **arrays)
    np.save(os.path.join(folder, "model_input.npy"), model_input)
    np.save(os.path.join(folder, "expected.npy"), expected)
    with open(os.path.join(folder, "kwargs.json"), "w") as f:
        json.dump({k: config[k] for k in ("n_channels", "n_classes", "width")}, f)
    with open(TWIN) as src, open(os.path.join(folder, "unet_torch.py"), "w") as dst:
        dst.write(src.read())
    info = run_worker(python, "convert", folder)
    for name in ("weights.npz", "model_input.npy", "expected.npy", "kwargs.json"):
        os.remove(os.path.join(folder, name))  # the package lists its files; these are not among them
    return info


def test_package(path, package, halo, block, torch_python):
    """test_model and a tiled prediction of every weight format: ONNX in this Python (a process of its own, so
    that bioimageio.core's output stays apart), the PyTorch ones in `torch_python`; DataError naming the first
    that failed, else {format: result}."""
    results = run_worker(sys.executable, "test", package, halo, block, "onnx")
    if torch_python:
        results.update(run_worker(torch_python, "test", package, halo, block, *TORCH_FORMATS))
    for weight_format, result in results.items():
        if result["status"] != "passed":
            raise DataError(
                f"{path}: not written, bioimageio.core's test failed ({weight_format}): {result['failure']}"
            )
    return results


def validation_warnings(package):
    """bioimageio.spec's warnings about the written package, one line each (io checks off: offline)."""
    from bioimageio.spec import load_model_description

    with contextlib.redirect_stdout(io.StringIO()):
        descr = load_model_description(package, perform_io_checks=False)
    warnings = []
    for detail in descr.validation_summary.details:
        for w in getattr(detail, "warnings", []) or []:
            loc = ".".join(str(part) for part in w.loc if "[" not in str(part))  # pydantic's validator names: noise
            warnings.append(" ".join(f"{loc}: {w.msg}".split()))
    return warnings


def write_package(path, onnx_path, state, checkpoint, image, curation, reference, arrays, torch_python):
    """Builds the package in a temporary folder, tests every weight format with bioimageio.core's test_model
    and a tiled prediction, and only then writes `path`; any failure is one DataError and no file.

    `reference` is the OneFlow model (NumPy Nx1xHxW -> probabilities), the truth every format is checked
    against; `arrays` its state dict as NumPy arrays, for the PyTorch weights when `torch_python` is given.
    Returns what was measured: halo, differences per format, blocks, warnings.
    """
    import_core()
    from bioimageio.spec import save_bioimageio_package

    forward = onnx_forward(open_session(onnx_path))
    halo, seams = measure_halo(forward, image)
    image = test_input(image, min_size(halo))
    model_input = standardise(image)[None, None]
    expected = reference(model_input)
    diffs = {"onnx": float(np.abs(forward(model_input) - expected).max())}
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(onnx_path, os.path.join(folder, "weights.onnx"))
        torch_info = None
        if torch_python:
            torch_info = add_torch_weights(folder, torch_python, state, arrays, model_input, expected)
            diffs.update(torch_info["max_difference"])
        formats = ["onnx", *TORCH_FORMATS] if torch_info else ["onnx"]
        for weight_format, diff in diffs.items():
            if diff > TOLERANCE:
                raise DataError(f"{path}: not written, its {weight_format} weights differ from OneFlow by {diff:.2e}")
        write_files(folder, image, expected, documentation(state, checkpoint, halo, formats))
        try:
            descr = describe(folder, state, curation, halo, torch_info)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            detail = " ".join(str(e).split())[:400]
            raise DataError(f"{path}: not written, the description is invalid ({detail})") from None
        package = os.path.join(folder, "package.zip")
        with contextlib.redirect_stdout(io.StringIO()):
            save_bioimageio_package(descr, output_path=package)
        results = test_package(path, package, halo, block_size(min(image.shape), halo), torch_info and torch_python)
        warnings = validation_warnings(package)
        with atomic_write(path, "the bioimage.io package") as tmp:
            shutil.copyfile(package, tmp)
    return {
        "halo": halo,
        "seams": seams,
        "max_difference": diffs,
        "tests": results,
        "warnings": warnings,
        "formats": formats,
        "torch": torch_info and torch_info["torch"],
    }
