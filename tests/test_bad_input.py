"""Bad input: one line on stderr naming the path and the problem, exit code 2, nothing written."""

import os

import cv2
import numpy as np
import pytest

from conftest import assert_fails, predict_script, run, snapshot, train_script
from isbi_unet.errors import DataError


def train(data_path, ckpt, *extra):
    return train_script(data_path, ckpt, *extra, check=False)


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


def test_label_without_image(data, tmp_path):
    os.remove(f"{data}/train/image/2.png")
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/label", "without an image", "2.png")
    assert not (tmp_path / "ckpt").exists()


def test_resume_from_a_missing_checkpoint(data, tmp_path):
    assert_fails(
        train(f"{data}/train", tmp_path / "ckpt", "--resume", tmp_path / "nothing"),
        tmp_path / "nothing",
        "no such checkpoint",
    )
    assert not (tmp_path / "ckpt").exists()


def test_predict_empty_test_folder(tmp_path):
    os.makedirs(tmp_path / "empty")
    proc = run(
        "predict_unet_test.py", "--Test_Data_path", tmp_path / "empty", "--save_res_path", tmp_path / "res", check=False
    )
    assert_fails(proc, tmp_path / "empty", "no images")
    assert not (tmp_path / "res").exists()


def test_mis_sized_label(data, tmp_path):
    cv2.imwrite(f"{data}/train/label/2.png", np.zeros((40, 48), np.uint8))
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/label/2.png", "differs")


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--epochs", 0),
        ("--batch_size", -1),
        ("--lr", 0),
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--width", 0),
        ("--val_slices", -1),
        ("--val_start", -2),
        ("--seed", -1),
        ("--seed", 2**32),
        ("--elastic_sigma", "inf"),
        ("--border_weight", "nan"),
        ("--num_workers", 10**4),
        ("--step_timeout", "inf"),
        ("--join_timeout", 0),
    ],
)
def test_nonsense_flags_are_refused_as_they_are_parsed(flag, value, capsys):
    from TrainUnetDataSet import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([flag, str(value)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: argument {flag}: must be "), err


def test_a_crop_the_poolings_cannot_take_is_refused_before_any_work(data, tmp_path):
    from TrainUnetDataSet import parse_args, resolve_args

    args = parse_args(["--data_path", f"{data}/train", "--checkpoint_dir", str(tmp_path / "ckpt"), "--crop_size", "8"])
    with pytest.raises(DataError, match="--crop_size"):
        resolve_args(args, cuda=False)
    assert not (tmp_path / "ckpt").exists()


def test_a_nonsense_flag_ends_the_process_with_one_line_and_nothing_written(data, tmp_path):
    assert_fails(train(f"{data}/train", tmp_path / "ckpt", "--epochs", 0), "--epochs: must be an integer in 1..")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("threshold", [1.5, 1.0])  # at 1 no pixel would be cell
def test_predict_nonsense_threshold(data, tmp_path, threshold):
    proc = run(
        "predict_unet_test.py",
        "--threshold",
        threshold,
        "--Test_Data_path",
        f"{data}/test",
        "--save_res_path",
        tmp_path / "res",
        check=False,
    )
    assert_fails(proc, "--threshold: must be a finite number in (0, 1)")


def test_held_out_block_past_the_last_slice(data, tmp_path):
    proc = train(f"{data}/train", tmp_path / "ckpt", "--val_start", 5)  # 2 slices from index 5 of 6
    assert_fails(proc, f"{data}/train", "--val_start 5", "past the last of 6 slices")
    assert not (tmp_path / "ckpt").exists()


def test_crop_larger_than_image(data, tmp_path):
    assert_fails(train(f"{data}/train", tmp_path / "ckpt", "--crop_size", 64), "smaller than --crop_size 64")


def test_predict_missing_checkpoint_writes_nothing(data, tmp_path):
    proc = predict_script(tmp_path / "none", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, tmp_path / "none", "no such checkpoint")
    assert not (tmp_path / "res").exists()


def test_predict_rejects_a_folder_that_is_not_a_checkpoint(data, tmp_path):
    proc = predict_script(f"{data}/test", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, f"{data}/test", "not a checkpoint")
    assert not (tmp_path / "res").exists()


def test_predict_refuses_a_checkpoint_of_the_unstandardised_format(data, tmp_path):
    # Written in-process, as the previous version of save_checkpoint did (its format marker /1).
    import oneflow as flow

    from unet import UNet

    old = tmp_path / "old"
    flow.save(
        {
            "format": "isbi-unet-oneflow/1",
            "model_config": UNet(1, 1, width=4).config(),
            "model": UNet(1, 1, width=4).state_dict(),
        },
        str(old),
    )
    proc = predict_script(old, f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, old, "older version of this repo on unstandardised input; retrain it")
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "label,problem",
    [
        (np.zeros((20, 48), np.uint8), "size 48x20 differs from its image's 48x48"),
        (np.full((48, 48), 128, np.uint8), "not a binary label"),
    ],
)
def test_evaluation_labels_are_checked_like_training_labels(data, trained, tmp_path, label, problem):
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        cv2.imwrite(str(labels / f"{i}.png"), cv2.imread(f"{data}/train/label/{i}.png", cv2.IMREAD_UNCHANGED))
    cv2.imwrite(str(labels / "1.png"), label)
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", "--label_path", labels, check=False)
    assert_fails(proc, labels / "1.png", problem)
    assert not (tmp_path / "res").exists()


def test_predict_missing_test_folder(tmp_path):
    proc = run(
        "predict_unet_test.py", "--Test_Data_path", tmp_path / "none", "--save_res_path", tmp_path / "res", check=False
    )
    assert_fails(proc, tmp_path / "none", "no such folder")


@pytest.mark.parametrize(
    "flags,fragments",
    [(["--width", 8], ["--width 8 differs from the run's 4"]), (["--bilinear"], ["--bilinear True", "run's False"])],
)
def test_resume_with_another_model_is_refused_and_changes_nothing(data, trained, flags, fragments):
    before = snapshot(trained)
    proc = train(f"{data}/train", trained, "--epochs", 2, "--resume", trained / "last", *flags)
    assert_fails(proc, trained / "config.json", *fragments)
    assert snapshot(trained) == before


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_resume_from_truncated_checkpoint_is_refused_and_changes_nothing(data, trained):
    truncate(trained / "last" / "pickled_data", 100)
    before = snapshot(trained)
    proc = train(f"{data}/train", trained, "--epochs", 2, "--resume", trained / "last")
    assert_fails(proc, trained / "last", "unreadable checkpoint", "truncated")
    assert snapshot(trained) == before


@pytest.mark.parametrize("damage", ["pickled_data", "tensor"])
def test_predict_with_corrupt_checkpoint_writes_nothing(data, trained, tmp_path, damage):
    if damage == "pickled_data":
        truncate(trained / "best" / "pickled_data", 100)
    else:
        for out in (trained / "best").glob("tensor_*/out"):
            truncate(out, 10)
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, trained / "best", "unreadable checkpoint")
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_unwritable_checkpoint_dir(data, tmp_path, where):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    ckpt = blocker / "out" if where == "under_a_file" else blocker
    assert_fails(train(f"{data}/train", ckpt), ckpt, "--checkpoint_dir", "is a file")
    assert blocker.read_text() == "not a folder"


def test_unwritable_result_folder_changes_nothing(data, trained, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    proc = predict_script(trained / "best", f"{data}/test", blocker / "res", check=False)
    assert_fails(proc, blocker / "res", "--save_res_path", "is a file")
    assert blocker.read_text() == "not a folder"


def test_predict_image_too_small(data, trained, tmp_path):
    cv2.imwrite(f"{data}/test/1.png", np.zeros((12, 48), np.uint8))
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, f"{data}/test/1.png", "smaller than 16 pixels")
    assert not (tmp_path / "res").exists()


def test_non_binary_label_stops_training(data, tmp_path):
    label = cv2.imread(f"{data}/train/label/4.png", cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(f"{data}/train/label/4.png", cv2.GaussianBlur(label, (9, 9), 3))  # soft edges, no longer 0/255
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/label/4.png", "not a binary label")
    assert not (tmp_path / "ckpt").exists()


def test_corrupt_png_stops_training(data, tmp_path):
    with open(f"{data}/train/image/1.png", "r+b") as f:
        f.truncate(60)  # the header survives, the pixels do not
    assert_fails(train(f"{data}/train", tmp_path / "ckpt"), f"{data}/train/image/1.png", "not a readable image")
    assert not (tmp_path / "ckpt").exists()


def warnings_of(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]


def test_colour_and_16_bit_inputs_are_converted_with_one_warning_each(data, tmp_path):
    image = cv2.imread(f"{data}/train/image/0.png", cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(f"{data}/train/image/0.png", cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(
        f"{data}/train/image/1.png",
        cv2.imread(f"{data}/train/image/1.png", cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257,
    )
    label = cv2.imread(f"{data}/train/label/5.png", cv2.IMREAD_GRAYSCALE)  # 5.png is a validation slice
    cv2.imwrite(f"{data}/train/label/5.png", cv2.cvtColor(label, cv2.COLOR_GRAY2BGRA))
    proc = train(f"{data}/train", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert sorted(warnings_of(proc)) == [
        f"warning: {data}/train/image/0.png: RGB image converted to grayscale",
        f"warning: {data}/train/image/1.png: 16-bit image scaled to 8-bit",
        f"warning: {data}/train/label/5.png: RGBA image converted to grayscale",
    ]

    test_image = cv2.imread(f"{data}/test/2.png", cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(f"{data}/test/2.png", cv2.cvtColor(test_image, cv2.COLOR_GRAY2BGR).astype(np.uint16) * 257)
    proc = predict_script(tmp_path / "ckpt" / "best", f"{data}/test", tmp_path / "res")
    assert warnings_of(proc) == [f"warning: {data}/test/2.png: 16-bit RGB image converted to 8-bit grayscale"]
    assert (tmp_path / "res" / "prob" / "2.png").is_file()


def test_plot_missing_log(tmp_path):
    assert_fails(run("plot.py", "--log", tmp_path / "log.csv", check=False), tmp_path / "log.csv", "no such log")


def test_a_device_that_does_not_exist_is_refused_by_name():
    from isbi_unet.device import select_device

    with pytest.raises(DataError, match=r"--device must be auto .*, cpu, cuda or cuda:N; got 'gpu'"):
        select_device("gpu")


@pytest.mark.parametrize("script", ["TrainUnetDataSet.py", "predict_unet_test.py"])
def test_asking_for_a_gpu_where_there_is_none_is_one_line_in_every_script(data, trained, tmp_path, script):
    import oneflow as flow

    if flow.cuda.is_available():
        pytest.skip("this machine has a CUDA device, so --device cuda is valid here")
    if script == "TrainUnetDataSet.py":
        proc = train(f"{data}/train", tmp_path / "out", "--device", "cuda")
    else:
        flags = [
            "--checkpoint",
            trained / "best",
            "--Test_Data_path",
            f"{data}/test",
            "--save_res_path",
            tmp_path / "out",
        ]
        proc = run(script, *flags, "--device", "cuda", check=False)
    assert_fails(proc, "--device cuda: no CUDA device is available")
    assert not (tmp_path / "out").exists()
