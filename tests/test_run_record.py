"""Run records: training's config.json and prediction's run.json say what produced them."""

import json
import os
import subprocess

import oneflow as flow

from conftest import REPO, predict_script, train_script
from isbi_unet.record import run_record


def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout.strip()


def test_record_names_versions_device_commit_and_command():
    record = run_record("cpu")
    assert record["oneflow"] == flow.__version__ and record["python"].count(".") == 2
    assert record["device"] == "cpu" and record["gpus"] == [] and record["oneflow_cuda_build"]
    assert record["git_commit"] == git("rev-parse", "HEAD")
    assert record["git_dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))
    assert record["utc"].endswith("Z") and record["hostname"] and record["command"]
    # which kernels ran: setup.sh pins OpenBLAS's on AVX2 CPUs, since they decide the trained weights
    assert record["openblas_coretype"] == (os.environ.get("OPENBLAS_CORETYPE") or "chosen by CPU")
    assert set(record["cpu_simd"]) <= {"avx2", "fma", "avx512f", "avx512_bf16"} and record["cpu"]


def test_record_outside_a_git_checkout(tmp_path):
    record = run_record(repo=str(tmp_path))
    assert record["git_commit"] == "unknown" and record["git_dirty"] is None


def test_training_and_prediction_write_their_records(data, tmp_path):
    ckpt, res = tmp_path / "ckpt", tmp_path / "res"
    train_script(f"{data}/train", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["width"] == 4 and config["epochs"] == 1 and config["world_size"] == 1  # the resolved settings
    assert config["device"] == "cpu:0" and config["oneflow"] == flow.__version__
    assert config["git_commit"] == git("rev-parse", "HEAD")
    assert "TrainUnetDataSet.py --data_path" in config["command"] and "--width 4" in config["command"]

    predict_script(ckpt / "best", f"{data}/test", res)
    record = json.loads((res / "run.json").read_text())
    assert record["args"]["checkpoint"] == str(ckpt / "best") and record["checkpoint_epoch"] == 1
    assert record["model_config"]["width"] == 4 and record["git_commit"] == config["git_commit"]
    assert "predict_unet_test.py" in record["command"]
