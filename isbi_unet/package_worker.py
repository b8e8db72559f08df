"""What the bioimage.io export runs in a Python with PyTorch (a side venv: `bash setup.sh --torch`), and the
package test both Pythons share. Needs NumPy and bioimageio.core; torch only for `convert` and the torch formats.

    PYTHON isbi_unet/package_worker.py convert FOLDER         # weights.npz -> weights.pt, weights_torchscript.pt
    PYTHON isbi_unet/package_worker.py test PACKAGE.zip HALO BLOCK FORMAT...   # test_model + a tiled prediction

`convert` loads FOLDER/weights.npz (the OneFlow checkpoint's state dict as NumPy arrays) into
unet_torch.UNet(**FOLDER/kwargs.json) with strict=True, saves its state dict and its torch.jit.script, runs both
on FOLDER/model_input.npy and prints, as one JSON line, their largest difference from FOLDER/expected.npy (what
OneFlow gave) and the torch version. `test` runs bioimageio.core's test_model on the package for each weight
format, then a blockwise prediction of its test input (blocks of BLOCK, a size the package declares) that must
equal the test output within 1/255 more than HALO px from the image border, and prints one JSON line per format.
Any failure is one line on stderr and exit code 2: the export turns it into its own one-line error.
This file imports nothing of the repo (the side Python has only torch, NumPy and bioimageio.core).
"""

import contextlib
import importlib.util
import io
import json
import os
import sys

import numpy as np

TILE_TOLERANCE = 1 / 255  # one grey level of the saved probability maps
TENSOR_IN, TENSOR_OUT = "raw", "cell_probability"


def load_twin():
    """unet_torch.py beside this file, as a module torch.jit.script can read the source of."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unet_torch.py")
    spec = importlib.util.spec_from_file_location("unet_torch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["unet_torch"] = module
    spec.loader.exec_module(module)
    return module


def convert(folder):
    """weights.pt and weights_torchscript.pt in `folder`; their max differences from expected.npy."""
    import torch

    with open(os.path.join(folder, "kwargs.json")) as f:
        kwargs = json.load(f)
    arrays = np.load(os.path.join(folder, "weights.npz"))
    model = load_twin().UNet(**kwargs)
    model.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files}, strict=True)
    model.eval()
    torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
    scripted = torch.jit.script(model)
    scripted.save(os.path.join(folder, "weights_torchscript.pt"))
    x = torch.from_numpy(np.load(os.path.join(folder, "model_input.npy")))
    expected = np.load(os.path.join(folder, "expected.npy"))
    loaded = torch.jit.load(os.path.join(folder, "weights_torchscript.pt"))
    with torch.no_grad():
        diffs = {
            "pytorch_state_dict": float(np.abs(model(x).numpy() - expected).max()),
            "torchscript": float(np.abs(loaded(x).numpy() - expected).max()),
        }
    return {"torch": torch.__version__.split("+")[0], "max_difference": diffs}


def first_failure(summary):
    """The first failed check of a ValidationSummary, its first sentence on one line."""
    for detail in summary.details:
        if detail.status == "failed":
            errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" if e.loc else e.msg for e in detail.errors]
            text = " ".join(f"{detail.name}: {errors[0] if errors else 'failed'}".split())
            return text.split(". ")[0]
    return summary.status


def tiled_difference(descr, weight_format, halo, block):
    """Largest |blockwise - whole| over the test input, more than `halo` px from its border; and the block count.

    The whole is the package's test output (the model on the whole slice). bioimageio.core standardises the
    whole sample before it cuts blocks, so only the halo decides whether tiles leave seams.
    """
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import get_test_input_sample, get_test_output_sample

    sample = get_test_input_sample(descr)
    expected = get_test_output_sample(descr).members[TENSOR_OUT].data.values
    shape = {TENSOR_IN: {"batch": 1, "channel": 1, "y": block, "x": block}}
    with create_prediction_pipeline(descr, weight_format=weight_format, devices=["cpu"]) as pipeline:
        tiled = pipeline.predict_sample_with_fixed_blocking(sample, input_block_shape=shape)
    got = tiled.members[TENSOR_OUT].data.values
    inner = (Ellipsis, slice(halo, -halo or None), slice(halo, -halo or None))
    inner_size = expected.shape[-1] - 2 * halo
    blocks = -(-expected.shape[-2] // (block - 2 * halo)) * -(-expected.shape[-1] // (block - 2 * halo))
    return float(np.abs(got[inner] - expected[inner]).max()) if inner_size > 0 else 0.0, blocks


def trust_github_users(descr):
    """test_model validates the description with its io checks on, which asks api.github.com whether each
    github_user exists and fails without a network; the names the export was given are taken as they are
    (bioimage.io's upload checks them)."""
    from bioimageio.spec._internal import constants

    people = [*descr.authors, *descr.maintainers]
    constants.KNOWN_GITHUB_USERS.update(p.github_user.lower() for p in people if p.github_user)


def test(package, halo, block, formats):
    """{format: {"status", "failure", "tiled_difference", "blocks"}} for the package, each format in turn."""
    os.environ.setdefault("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bioimageio.core's progress bar per block: noise in the export's log
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    with contextlib.redirect_stdout(io.StringIO()):
        descr = load_model_description(package, perform_io_checks=False)
    trust_github_users(descr)
    results = {}
    for weight_format in formats:
        summary = test_model(descr, weight_format=weight_format, devices=["cpu"])
        result = {"status": summary.status, "failure": None if summary.status == "passed" else first_failure(summary)}
        if summary.status == "passed":
            diff, blocks = tiled_difference(descr, weight_format, halo, block)
            result.update(tiled_difference=diff, blocks=blocks)
            if diff > TILE_TOLERANCE:
                result.update(status="failed", failure=f"tiled prediction differs from the whole by {diff:.4f}")
        results[weight_format] = result
    return results


def main(argv):
    command, *rest = argv
    if command == "convert":
        (folder,) = rest
        return convert(folder)
    if command == "test":
        package, halo, block, *formats = rest
        return test(package, int(halo), int(block), formats)
    raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    # Run as a script, its folder leads sys.path, and isbi_unet/bioimageio.py would shadow the bioimageio package.
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # bioimageio.core's and torch's chatter: not the result
            result = main(sys.argv[1:])
    except Exception as e:  # any failure: one line for the export to quote
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"{type(e).__name__}: {detail}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result), flush=True)
