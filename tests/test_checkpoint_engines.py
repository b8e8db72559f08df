"""--engine for OneFlow checkpoints: on a CPU the default (`auto`) converts a checkpoint to ONNX as it loads and runs
it in ONNX Runtime, with the probabilities of OneFlow's own pass within 1e-6; `--engine oneflow` (and a GPU, and
--graph) keep OneFlow; a model the converter cannot take runs in OneFlow under `auto`, with one warning, and is one
line when a converting engine is asked for by name."""

import json

import numpy as np
import pytest
import tifffile

from conftest import assert_fails, predict_script
from isbi_unet.predictor import AUTO, ONEFLOW, runs_in

pytest.importorskip("onnxruntime")  # requirements-onnx.txt installs only on CPython 3.10+


def probabilities(res):
    return tifffile.imread(res / "submission.tif")


@pytest.mark.parametrize(
    "path, engine, device, graph, expected",
    [
        ("ckpt/best", AUTO, "cpu", False, "onnxruntime"),
        ("ckpt/best", AUTO, "cuda:0", False, ONEFLOW),
        ("ckpt/best", AUTO, "cpu", True, ONEFLOW),
        ("ckpt/best", ONEFLOW, "cpu", False, ONEFLOW),
        ("ckpt/best", "openvino", "cpu", False, "openvino"),
        ("unet.onnx", ONEFLOW, "cpu", False, "onnxruntime"),
        ("unet.onnx", AUTO, "cuda", False, "onnxruntime"),
        ("model.zip", "openvino-bf16", "cpu", False, "openvino-bf16"),
    ],
)
def test_what_runs_a_model(path, engine, device, graph, expected):
    assert runs_in(path, engine, device, graph) == expected


def test_a_checkpoint_runs_in_onnx_runtime_on_a_cpu_with_oneflows_answer(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the conversion's temporary folder, seen to go
    (tmp_path / "tmp").mkdir()
    images = trained_run.parent / "data" / "test"
    auto = predict_script(trained_run / "best", images, tmp_path / "auto").stdout
    flow = predict_script(trained_run / "best", images, tmp_path / "flow", "--engine", ONEFLOW).stdout
    assert "ONNX Runtime (converted)" in auto and "x 1 process(es)" in auto  # one process: ONNX Runtime's threads
    assert "ONNX Runtime" not in flow and "converted" not in flow
    assert np.abs(probabilities(tmp_path / "auto") - probabilities(tmp_path / "flow")).max() <= 1e-6
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["runtime"] == "ONNX Runtime (converted)"
    assert json.loads((tmp_path / "flow" / "run.json").read_text())["runtime"] == "OneFlow"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_checkpoint_runs_in_openvino_when_asked(trained_run, tmp_path):
    pytest.importorskip("openvino")
    images = trained_run.parent / "data" / "test"
    predict_script(trained_run / "best", images, tmp_path / "flow", "--engine", ONEFLOW)
    out = predict_script(trained_run / "best", images, tmp_path / "vino", "--engine", "openvino").stdout
    assert "OpenVINO f32 (converted)" in out
    assert np.abs(probabilities(tmp_path / "vino") - probabilities(tmp_path / "flow")).max() <= 1e-6


def test_a_model_the_converter_cannot_take_runs_in_oneflow(bilinear, trained_run, tmp_path):
    images = trained_run.parent / "data" / "test"
    proc = predict_script(bilinear, images, tmp_path / "auto")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"{bilinear} runs in OneFlow" in warnings[0] and "converted" in warnings[0]
    assert "ONNX Runtime" not in proc.stdout
    named = predict_script(
        bilinear, images, tmp_path / "named", "--engine", "onnxruntime", "--device", "cpu", check=False
    )
    assert_fails(named, str(bilinear), "could not be converted to ONNX")
    assert not (tmp_path / "named").exists()
