"""OpenVINO inference of an export_onnx.py file or bioimage.io package: `predict_unet_test.py --engine openvino`.

ONNX Runtime stays the default engine. Measured side by side on a width-16 export (tools/engines.py, docs/volumes.md):
OpenVINO in f32 gives the same probabilities within 2e-7 but was not reliably faster on a shared 2-core machine;
in bf16 (`--engine openvino-bf16`, on CPUs with AVX512-BF16 or AMX) it was 1.3-2.1x faster while probabilities
moved by up to 0.012 (more than 1/255, so never chosen silently), with ISBI scores of 5 held-out slices within
0.005. The model file is read and checked as ONNX Runtime reads it (its metadata: the record and input size), then
compiled by OpenVINO's CPU plugin. Needs openvino (requirements-openvino.txt, CPython 3.10+).
"""

import os
import tempfile

import numpy as np

from isbi_unet.errors import DataError
from isbi_unet.onnx_backend import is_package, load_onnx, read_package

INSTALL = "pip install -r requirements-openvino.txt (CPython 3.10+), or `source setup.sh`"
ONNX_RUNTIME = "onnxruntime"
# --engine: the precision OpenVINO computes in (None: ONNX Runtime, the default)
ENGINES = {ONNX_RUNTIME: None, "openvino": "f32", "openvino-bf16": "bf16"}


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise DataError(f"--engine openvino needs openvino, which is not installed: {INSTALL}") from None
    return openvino


def read_model(core, path):
    """OpenVINO's model of an .onnx file, or of the .onnx inside a package (through a temporary file)."""
    if not is_package(path):
        return core.read_model(path)
    with tempfile.TemporaryDirectory() as folder:
        onnx = os.path.join(folder, "model.onnx")
        with open(onnx, "wb") as f:
            f.write(read_package(path))
        return core.read_model(onnx)


class OpenVinoBackend:
    """An export_onnx.py file or bioimage.io package, run by OpenVINO's CPU plugin in `precision` (f32 or bf16)."""

    runtime = "OpenVINO"
    uses_every_core = True  # OpenVINO's own threads
    converted = False  # True for a OneFlow checkpoint converted as it loaded

    def __init__(self, path, threads, precision):
        session, self.state = load_onnx(path, threads)  # the same checks and record as with ONNX Runtime
        del session
        self.input_size = self.state.get("input_size")
        self.precision = precision
        ov = import_openvino()
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            compiled = core.compile_model(read_model(core, path), "CPU", config)
        except RuntimeError as e:  # OpenVINO's own words for a model or precision it cannot take
            raise DataError(f"{path}: OpenVINO cannot run it in {precision} ({str(e).splitlines()[0]})") from None
        self.request, self.output = compiled.create_infer_request(), compiled.output(0)

    def probabilities(self, batch):
        result = self.request.infer([np.ascontiguousarray(batch, np.float32)])[self.output]
        return np.array(result, np.float32)
