"""Export a trained checkpoint to ONNX with OneFlow's own converter (oneflow-onnx), then check it against OneFlow.

    python3 export_onnx.py --checkpoint checkpoints/best --out unet.onnx     # any Nx1xHxW, H and W multiples of 16
    python3 export_onnx.py --checkpoint checkpoints/best --bioimageio isbi-membrane-unet.zip   # docs/bioimageio.md
    python3 predict_unet_test.py --checkpoint unet.onnx --Test_Data_path data/test --save_res_path results_onnx

The model (sigmoid included: the output is the cell probability) is compiled as an nn.Graph at 1x1xSIZExSIZE
and converted. The converter writes each up-convolution's pixel shuffle as reshapes to the traced shape;
they become ONNX DepthToSpace, so batch, height and width are free in the file (opset 11 or more, the
lowest IR version that opset allows, which older ONNX Runtimes such as deepImageJ's can read). Its
metadata_props get the model config, the traced size and the preprocessing (isbi_unet/onnx_backend.py),
so the .onnx file alone is enough to predict. ONNX Runtime and OneFlow then both predict a real slice (the
first of --check_data, mirrored or cropped to SIZE, and a batch of two smaller non-square crops); the max
difference of their probabilities is printed, and above --tolerance the export is discarded with exit
code 2. The file appears only once checked (written to a temporary file beside it, then renamed).
With --bioimageio the checked model also becomes a bioimage.io package (isbi_unet/bioimageio.py).
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C inside `import oneflow`: one line, exit 130 (isbi_unet/process/interrupt.py)

import os
import shutil
import tempfile

import numpy as np
import oneflow as flow

from isbi_unet import bioimageio as bio
from isbi_unet import onnx_backend as ob
from isbi_unet.checkpoint import load_model
from isbi_unet.errors import DataError, atomic_write, check_apart, check_output_dir
from isbi_unet.flags import Above, Parser
from isbi_unet.formats import POOL
from isbi_unet.images import preprocess, read_slice, slice_names
from isbi_unet.onnx_export import MAX_OPSET, MIN_OPSET, write_onnx
from isbi_unet.outputs import claim_file
from isbi_unet.process import run_main

DEFAULT_OUT = "unet.onnx"
MAX_SIZE = 4096  # the check runs the model on one SIZE x SIZE slice: a width-64 one there takes about 8 GB


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--checkpoint", default="checkpoints/best", help="checkpoint directory written by training")
    p.add_argument(
        "--out", help=f"the ONNX file to write, named .onnx (default: {DEFAULT_OUT}, or none with --bioimageio)"
    )
    p.add_argument(
        "--bioimageio", help="write a bioimage.io model package (.zip) for Fiji and napari (docs/bioimageio.md)"
    )
    p.add_argument(
        "--author",
        action="append",
        help="with --bioimageio (required there): an author of the package, by name; repeat for several",
    )
    p.add_argument(
        "--github_user",
        action="append",
        help="the GitHub account of the --author in the same position; those with one maintain the package",
    )
    p.add_argument("--package_version", default="0.1.0", help="the package's version (with --bioimageio)")
    p.add_argument("--git_repo", help="the package's source repository, an https URL (with --bioimageio)")
    p.add_argument(
        "--torch_python",
        help="a Python with torch and bioimageio.core that adds the pytorch_state_dict and torchscript weights "
        f"(default: .venv-torch/bin/python, made by `bash setup.sh --torch`, when there; '{bio.NO_TORCH}': ONNX only)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=512,
        bounds=(POOL, MAX_SIZE),
        help="side of the square input it is traced and checked at, a multiple of 16",
    )
    p.add_argument(
        "--check_data",
        default="data/test",
        help="folder of images or TIFF stack whose first slice checks ONNX Runtime against OneFlow "
        "(and is the package's test image and cover)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        bounds=(Above(0), 1),
        help="largest allowed difference of probabilities in the check",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=MIN_OPSET,
        bounds=(MIN_OPSET, MAX_OPSET),
        help=f"ONNX opset, {MIN_OPSET} (DepthToSpace's CRD mode) to {MAX_OPSET} (the newest ONNX Runtime runs)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --out or --bioimageio file that this repo did not write"
    )
    args = p.parse_args(argv)
    if args.out is None and args.bioimageio is None:
        args.out = DEFAULT_OUT
    return args


def check_args(args):
    if args.size % POOL:
        raise DataError(f"--size must be a multiple of {POOL} (four 2x2 poolings), got {args.size}")
    if args.out is not None and not args.out.lower().endswith(".onnx"):
        raise DataError(f"{args.out}: name the ONNX file .onnx (predict_unet_test.py picks ONNX Runtime by it)")
    if args.bioimageio is not None and not ob.is_package(args.bioimageio):
        raise DataError(f"{args.bioimageio}: name the bioimage.io package .zip")
    inputs = [(args.checkpoint, "--checkpoint"), (args.check_data, "--check_data")]
    outputs = ((args.out, "--out", "ONNX export"), (args.bioimageio, "--bioimageio", "bioimage.io package"))
    for path, flag, kind in outputs:
        if path is not None:
            check_apart(path, flag, inputs)
            check_output_dir(os.path.dirname(os.path.abspath(path)), flag)
            claim_file(path, flag, kind, args.overwrite)
    ob.import_onnxruntime()  # before the slow part: without it there is nothing to check against
    if args.bioimageio is not None:
        check_package_args(args)


def check_package_args(args):
    """--bioimageio's own flags; the torch Python is run once here, before the slow part."""
    if not args.author:
        raise DataError("--bioimageio needs --author NAME (the package names its authors; no placeholder people)")
    if len(args.github_user or []) > len(args.author):
        raise DataError(f"--github_user: {len(args.github_user)} given for {len(args.author)} --author")
    if args.opset > bio.MAX_OPSET:
        raise DataError(f"--opset {args.opset}: deepImageJ reads opset {bio.MAX_OPSET} at most; pass one up to it")
    if args.git_repo is not None and not args.git_repo.startswith("https://"):
        raise DataError(f"--git_repo {args.git_repo}: give the repository's https:// URL")
    bio.import_core()
    args.torch_python = bio.find_torch_python(args.torch_python)
    if args.torch_python:
        bio.check_torch_python(args.torch_python)


def first_slice(source):
    """The first slice of `source`, uint8 HxW, as read for prediction."""
    return read_slice(source, slice_names(source)[0])


def check_inputs(image, size):
    """The preprocessed slice mirrored or cropped to 1x1xSIZExSIZE, and a batch of two non-square crops
    (its two corners) of about half that, so that free batch, height and width are all exercised."""
    x = preprocess(image)[0]
    reps = (-(-size // x.shape[0]), -(-size // x.shape[1]))
    x = np.pad(x, [(0, (r - 1) * n) for r, n in zip(reps, x.shape)], mode="symmetric")[:size, :size]
    h, w = max(POOL, size // 2 // POOL * POOL), max(POOL, size * 3 // 4 // POOL * POOL)
    crops = np.stack([x[:h, :w], x[-h:, -w:]])[:, None]
    return [np.ascontiguousarray(x)[None, None], np.ascontiguousarray(crops)]


def max_difference(model, path, inputs):
    """Largest |ONNX Runtime - OneFlow| of the probabilities over the batches `inputs`."""
    session, _ = ob.load_onnx(path)
    forward = ob.onnx_forward(session)
    diff = 0.0
    for x in inputs:
        with flow.no_grad():
            expected = flow.sigmoid(model(flow.tensor(x))).numpy()
        diff = max(diff, float(np.abs(forward(x) - expected).max()))
    return diff


def export(args, model, state, image, path):
    """Converts, frees the sizes, adds the metadata and checks `path`; DataError when the check fails."""
    write_onnx(model, state, args.checkpoint, path, args.size, args.opset)
    diff = max_difference(model, path, check_inputs(image, args.size))
    if diff > args.tolerance:
        out = args.out or args.bioimageio
        raise DataError(f"{out}: not written, ONNX Runtime differs from OneFlow by {diff:.2e} > {args.tolerance}")
    return diff


def write_package(args, model, state, image, path):
    """The bioimage.io package of the checked ONNX file `path` (and PyTorch weights with a torch Python)."""
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}  # NumPy: the torch side needs no OneFlow

    def reference(x):
        with flow.no_grad():
            return flow.sigmoid(model(flow.tensor(x))).numpy()

    curation = {
        "authors": args.author,
        "github_users": args.github_user,
        "version": args.package_version,
        "git_repo": args.git_repo,
    }
    return bio.write_package(
        args.bioimageio, path, state, args.checkpoint, image, curation, reference, arrays, args.torch_python
    )


def print_package(args, report):
    """What the package holds and what was measured, and how to add PyTorch weights when they are missing."""
    seams = ", ".join(f"{h} px {d:.4f}" for h, d in report["seams"].items())
    diffs = ", ".join(f"{f} {d:.1e}" for f, d in report["max_difference"].items())
    blocks = report["tests"]["onnx"].get("blocks")
    tiled = ", ".join(f"{f} {r['tiled_difference']:.1e}" for f, r in report["tests"].items())
    print(
        f"{args.bioimageio}: bioimage.io model package, weights {', '.join(report['formats'])}; halo "
        f"{report['halo']} px (tiles vs whole slice: {seams}); max difference from OneFlow: {diffs}; "
        f"bioimageio.core's test_model passed for every format, and its tiled prediction ({blocks} blocks) "
        f"differs from the whole slice by {tiled}"
    )
    for warning in report["warnings"]:
        print(f"{args.bioimageio}: bioimageio.spec warns: {warning}")
    if not args.torch_python:
        print(
            f"{args.bioimageio}: ONNX weights only (deepImageJ, bioimageio.core); for ilastik, QuPath and BiaPy "
            f"add PyTorch weights: {bio.ADD_TORCH}, then export again"
        )


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    check_args(args)
    model, state = load_model(args.checkpoint, "cpu")
    if args.bioimageio and args.torch_python:
        bio.check_twin(state["model_config"])  # before converting: the twin's refusal is the one to report
    image = first_slice(args.check_data)
    with tempfile.TemporaryDirectory() as tmp:  # nothing appears at --out or --bioimageio before its checks pass
        path = os.path.join(tmp, "weights.onnx")
        diff = export(args, model, state, image, path)
        size = os.path.getsize(path) / 1e6
        if args.bioimageio:
            report = write_package(args, model, state, image, path)
        if args.out:
            with atomic_write(args.out, "the ONNX file") as out:
                shutil.copyfile(path, out)
    print(
        f"{args.out or 'ONNX'}: UNet{state['model_config']}, epoch {state.get('epoch')}, input Nx1xHxW (H and W "
        f"multiples of {POOL}; traced at {args.size}x{args.size}), {size:.1f} MB; ONNX Runtime vs OneFlow on "
        f"{args.check_data}: max difference of probabilities {diff:.1e}"
    )
    if args.bioimageio:
        print_package(args, report)


if __name__ == "__main__":
    run_main(main)
