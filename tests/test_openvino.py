"""--engine: OpenVINO runs the .onnx exports besides ONNX Runtime, f32 with the same probabilities (within 1e-6),
bf16 only when asked for by name and then close (within 0.05 here; 0.012 measured on ISBI slices), each named in
the summary and the record (OneFlow checkpoints in OpenVINO: tests/test_checkpoint_engines.py)."""

import json

import numpy as np
import pytest
import tifffile
from test_onnx import exported  # noqa: F401  the session's export, made once

from conftest import predict_script

pytest.importorskip("onnxruntime")  # requirements-onnx.txt and -openvino.txt install only on CPython 3.10+
pytest.importorskip("openvino")

FLAGS = ["--device", "cpu", "--workers", 1]


def probabilities(res):
    return tifffile.imread(res / "submission.tif")


def test_openvino_f32_keeps_the_answer_and_bf16_is_named(exported, trained_run, tmp_path):  # noqa: F811
    images = trained_run.parent / "data" / "test"
    predict_script(exported, images, tmp_path / "ort", *FLAGS)
    out = {
        e: predict_script(exported, images, tmp_path / e, *FLAGS, "--engine", e).stdout
        for e in ("openvino", "openvino-bf16")
    }
    reference = probabilities(tmp_path / "ort")
    assert np.abs(probabilities(tmp_path / "openvino") - reference).max() <= 1e-6
    assert 0 < np.abs(probabilities(tmp_path / "openvino-bf16") - reference).max() <= 0.05
    assert "OpenVINO f32" in out["openvino"] and "OpenVINO bf16" in out["openvino-bf16"]
    assert json.loads((tmp_path / "openvino-bf16" / "run.json").read_text())["args"]["engine"] == "openvino-bf16"
