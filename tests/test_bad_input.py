"""Bad input: one line on stderr naming the path and the problem, exit code 2, nothing written."""
import os

import cv2
import numpy as np
import pytest

from conftest import TINY, assert_fails, run


def train(data_path, ckpt, *extra):
    return run("TrainUnetDataSet.py", "--data_path", data_path, "--epochs", 1, "--checkpoint_dir", ckpt, *TINY, *extra, check=False)


def test_missing_data_folder(tmp_path):
    assert_fails(train(tmp_path / "nowhere", tmp_path / "ckpt"), tmp_path / "nowhere" / "image", "no such folder")
    assert not (tmp_path / "ckpt").exists()


def test_empty_data_folder(tmp_path):
    os.makedirs(tmp_path / "d" / "image"), os.makedirs(tmp_path / "d" / "label")
    assert_fails(train(tmp_path / "d", tmp_path / "ckpt"), tmp_path / "d" / "image", "no images")


def test_unpaired_files(data, tmp_path):
    os.remove(f"{data}/train/label/3.png")
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/image", "without a label", "3.png")
    assert not (tmp_path / "ckpt").exists()


def test_mis_sized_label(data, tmp_path):
    cv2.imwrite(f"{data}/train/label/2.png", np.zeros((40, 48), np.uint8))
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/label/2.png", "differs")


@pytest.mark.parametrize("flag,value", [("--epochs", 0), ("--batch_size", -1), ("--crop_size", 8)])
def test_nonsense_flags(data, tmp_path, flag, value):
    assert_fails(train(f"{data}/train", tmp_path / "ckpt", flag, value), flag)


def test_crop_larger_than_image(data, tmp_path):
    assert_fails(train(f"{data}/train", tmp_path / "ckpt", "--crop_size", 64), "smaller than --crop_size 64")


def test_predict_missing_checkpoint_writes_nothing(data, tmp_path):
    proc = run("predict_unet_test.py", "--checkpoint", tmp_path / "none", "--Test_Data_path", f"{data}/test",
               "--save_res_path", tmp_path / "res", check=False)
    assert_fails(proc, tmp_path / "none", "no such checkpoint")
    assert not (tmp_path / "res").exists()


def test_predict_rejects_a_folder_that_is_not_a_checkpoint(data, tmp_path):
    proc = run("predict_unet_test.py", "--checkpoint", f"{data}/test", "--Test_Data_path", f"{data}/test",
               "--save_res_path", tmp_path / "res", check=False)
    assert_fails(proc, f"{data}/test", "not a checkpoint")
    assert not (tmp_path / "res").exists()


def test_predict_missing_test_folder(tmp_path):
    proc = run("predict_unet_test.py", "--Test_Data_path", tmp_path / "none", "--save_res_path", tmp_path / "res", check=False)
    assert_fails(proc, tmp_path / "none", "no such folder")


def test_resume_with_another_width_is_refused(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run("TrainUnetDataSet.py", "--data_path", f"{data}/train", "--epochs", 1, "--checkpoint_dir", ckpt, *TINY)
    proc = train(f"{data}/train", ckpt, "--resume", ckpt / "last", "--width", 8)
    assert_fails(proc, ckpt / "last", "'width': 4", "'width': 8")


def test_plot_missing_log(tmp_path):
    assert_fails(run("plot.py", "--log", tmp_path / "log.csv", check=False), tmp_path / "log.csv", "no such log")
