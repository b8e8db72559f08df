"""Export a trained checkpoint to ONNX with OneFlow's own converter (oneflow-onnx), then check it against OneFlow.

    python3 export_onnx.py --checkpoint checkpoints/best --out unet.onnx             # 1x1x512x512 input
    python3 export_onnx.py --checkpoint checkpoints/best --out unet256.onnx --size 256
    python3 predict_unet_test.py --checkpoint unet.onnx --Test_Data_path data/test --save_res_path results_onnx

The model (sigmoid included: the output is the cell probability) is compiled as an nn.Graph at 1x1xSIZExSIZE
and converted; its metadata_props then get the model config, the input size and the preprocessing
(isbi_unet/onnx_backend.py), so the .onnx file alone is enough to predict. ONNX Runtime and OneFlow then
both predict a real slice (the first of --check_data, mirrored or cropped to SIZE); the max difference of
their probabilities is printed, and above --tolerance the export is discarded with exit code 2. The file
appears only once checked (written to a temporary file beside it, then renamed).
"""

from isbi_unet.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C inside `import oneflow`: one line, exit 130 (isbi_unet/interrupt.py)

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import oneflow as flow

from isbi_unet import onnx_backend as ob
from isbi_unet.checkpoint import load_model
from isbi_unet.errors import DataError, atomic_write, check_apart, check_flags, check_output_dir, run_main
from isbi_unet.images import preprocess, read_slice, slice_names
from isbi_unet.tiling import POOL


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/best", help="checkpoint directory written by training")
    p.add_argument("--out", default="unet.onnx", help="the ONNX file to write (name it .onnx)")
    p.add_argument("--size", type=int, default=512, help="side of the square input, a multiple of 16")
    p.add_argument(
        "--check_data",
        "--check-data",
        default="data/test",
        help="folder of images or TIFF stack whose first slice checks ONNX Runtime against OneFlow",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest allowed difference of probabilities in the check"
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the converter's)")
    return p.parse_args(argv)


def check_args(args):
    check_flags(args, positive=("size", "tolerance", "opset"))
    if args.size % POOL:
        raise DataError(f"--size must be a multiple of {POOL} (four 2x2 poolings), got {args.size}")
    if not ob.is_onnx(args.out):
        raise DataError(f"{args.out}: name the ONNX file .onnx (predict_unet_test.py picks ONNX Runtime by it)")
    check_apart(args.out, "--out", [(args.checkpoint, "--checkpoint"), (args.check_data, "--check_data")])
    check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    ob.import_onnxruntime()  # before the slow part: without it there is nothing to check against


def import_converter():
    if "bool" not in np.__dict__:  # __dict__, as hasattr would trigger NumPy 1.26's FutureWarning
        # oneflow-onnx 0.6.2's util.py maps TensorProto.BOOL to np.bool, which NumPy 1.24 removed.
        np.bool = bool
    try:
        from oneflow_onnx.oneflow2onnx.util import export_onnx_model
    except ImportError:
        raise DataError(f"exporting needs oneflow-onnx, which is not installed: {ob.INSTALL}") from None
    return export_onnx_model


class ProbabilityGraph(flow.nn.Graph):
    """sigmoid(model(x)), compiled at one input shape: what the converter reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def build(self, x):
        return flow.sigmoid(self.model(x))


def convert(model, size, path, opset=None):
    """Writes the converted graph to `path`; the converter's weight folder lives in a temporary dir."""
    export_onnx_model = import_converter()
    graph = ProbabilityGraph(model)
    graph._compile(flow.zeros(1, 1, size, size))  # the converter reads the compiled graph's ops
    with tempfile.TemporaryDirectory() as weights:
        flow.save(graph.state_dict(), weights)
        stdout, sys.stdout = sys.stdout, sys.stderr  # its progress prints go to stderr, our result to stdout
        try:
            export_onnx_model(graph, opset=opset, flow_weight_dir=weights, onnx_model_path=path)
        except Exception as e:  # e.g. bilinear=True: its handler for align_corners upsampling fails
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise DataError(f"OneFlow's converter (oneflow-onnx) failed on UNet{model.config()}: {detail}") from None
        finally:
            sys.stdout = stdout


def add_metadata(path, state, size, checkpoint):
    """Model config, input size, preprocessing and provenance into metadata_props, in place."""
    import onnx

    model = onnx.load(path)
    meta = {
        ob.KEY_FORMAT: ob.FORMAT,
        ob.KEY_CONFIG: json.dumps(state["model_config"]),
        ob.KEY_SIZE: str(size),
        ob.KEY_PREPROCESS: ob.PREPROCESS,
        ob.KEY_OUTPUT: ob.OUTPUT,
        ob.KEY_EPOCH: json.dumps(state.get("epoch")),
        ob.KEY_SOURCE: os.path.abspath(checkpoint),
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def check_slice(source, size):
    """The first slice of `source`, preprocessed, mirrored or cropped to 1x1xSIZExSIZE."""
    image = preprocess(read_slice(source, slice_names(source)[0]))[0]
    reps = (-(-size // image.shape[0]), -(-size // image.shape[1]))
    image = np.pad(image, [(0, (r - 1) * n) for r, n in zip(reps, image.shape)], mode="symmetric")
    return np.ascontiguousarray(image[:size, :size])[None, None]


def max_difference(model, path, x):
    """Largest |ONNX Runtime - OneFlow| of the probabilities of x."""
    session, _ = ob.load_onnx(path)
    with flow.no_grad():
        expected = flow.sigmoid(model(flow.tensor(x))).numpy()
    return float(np.abs(ob.onnx_forward(session)(x) - expected).max())


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    check_args(args)
    model, state = load_model(args.checkpoint, "cpu")
    x = check_slice(args.check_data, args.size)
    with atomic_write(args.out, "the ONNX file") as tmp:  # a failed check leaves no file and no temporary
        convert(model, args.size, tmp, args.opset)
        add_metadata(tmp, state, args.size, args.checkpoint)
        diff = max_difference(model, tmp, x)
        if diff > args.tolerance:
            raise DataError(
                f"{args.out}: not written, ONNX Runtime differs from OneFlow by {diff:.2e} > {args.tolerance}"
            )
    print(
        f"{args.out}: UNet{state['model_config']}, epoch {state.get('epoch')}, input 1x1x{args.size}x{args.size}, "
        f"{os.path.getsize(args.out) / 1e6:.1f} MB; ONNX Runtime vs OneFlow on a slice of {args.check_data}: "
        f"max difference of probabilities {diff:.1e}"
    )


if __name__ == "__main__":
    run_main(main)
