"""benchmark.py end to end: real OneFlow steps at the CPU recipe's shapes, one process and two."""

import json

import pytest

from conftest import assert_fails, run


def test_benchmark_reports_a_row_and_json(tmp_path):
    out = run(
        "benchmark.py",
        "--setting",
        "cpu",
        "--modes",
        "eager",
        "--steps",
        1,
        "--warmup",
        0,
        "--json",
        tmp_path / "bench.json",
    ).stdout
    assert "train ms/step" in out and "oneflow 0.9.0" in out
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert result["mode"] == "eager" and result["setting"] == "cpu" and result["images"] == 4
    assert result["params"] == 1_942_289 and result["train_s"] > 0 and result["infer_s"] > 0 and result["peak_mb"] > 100


def test_benchmark_rejects_a_missing_torch_interpreter(tmp_path):
    proc = run("benchmark.py", "--torch_python", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "no such interpreter" in proc.stderr


@pytest.mark.slow
def test_data_parallel_modes_leave_both_processes_with_the_same_weights(tmp_path):
    run(
        "benchmark.py",
        "--setting",
        "cpu",
        "--modes",
        "ddp2,graph_ddp2",
        "--width",
        4,
        "--steps",
        1,
        "--warmup",
        1,
        "--json",
        tmp_path / "bench.json",
    )
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["mode"] for r in rows] == ["ddp2", "graph_ddp2"]
    for r in rows:  # width 4: --width reached the model; the batch of 4 is split over the 2 processes
        assert r["params"] == 122_021 and r["images"] == 4 and r["replicas_agree"] is True and r["infer_s"] is None


def test_benchmark_rejects_a_zero_width():
    assert_fails(
        run("benchmark.py", "--width", 0, check=False), "argument --width: must be an integer in 1..1024, got 0"
    )


def test_onnx_mode_times_onnx_runtime_inference_only(tmp_path):
    pytest.importorskip("onnxruntime")  # requirements-onnx.txt installs only on CPython 3.10+
    args = ["--setting", "cpu", "--modes", "onnx", "--width", 4, "--steps", 1, "--warmup", 0]
    out = run("benchmark.py", *args, "--json", tmp_path / "bench.json").stdout
    assert "onnxruntime 1.19.2" in out
    (row,) = json.loads((tmp_path / "bench.json").read_text())
    assert row["mode"] == "onnx" and row["params"] == 122_021 and row["train_s"] is None and row["infer_s"] > 0
