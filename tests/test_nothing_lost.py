"""Slips a user makes: outputs aimed at inputs or at a finished run, odd labels and sizes. Nothing is lost."""

import csv
import os
import re

import cv2
import numpy as np
import pytest

from conftest import TINY, assert_fails, predict_script, run, snapshot, train_script, write_dataset
from isbi_unet.errors import DataError

FINITE_BEST = re.compile(r"\(validation V_rand [01]\.\d{4}\)$")


def epochs_in(log):
    with open(log, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


# --- outputs never over inputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "res,relation",
    [("{data}/test", "is"), ("{data}/test/out", "lies inside"), ("{data}", "contains"), ("{data}/train/label", "is")],
)
def test_predictions_are_never_written_over_inputs(data, trained, res, relation):
    res = res.format(data=data)
    before = snapshot(data)
    proc = predict_script(trained / "best", f"{data}/test", res, "--label_path", f"{data}/train/label", check=False)
    assert_fails(proc, f"{res}: --save_res_path {relation}", "write outputs to a folder apart from inputs")
    assert snapshot(data) == before


def test_two_inputs_with_one_output_name_are_refused(data, trained, tmp_path):
    cv2.imwrite(f"{data}/test/1.tif", cv2.imread(f"{data}/test/1.png"))
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", check=False)
    assert_fails(proc, "1.png and 1.tif would both be written as 1.png")
    assert not (tmp_path / "res").exists()


def test_overlays_never_replace_the_masks_they_draw(data, trained, tmp_path):
    res = tmp_path / "res"
    predict_script(trained / "best", f"{data}/test", res)
    before = snapshot(res)
    assert_fails(run("visualize.py", "--res_path", res, "--overlay_dir", res, check=False), "whose masks")
    proc = run("visualize.py", "--res_path", res, "--overlay_dir", f"{data}/test", check=False)
    assert_fails(proc, "--overlay_dir is --image_path")
    assert snapshot(res) == before


def test_plot_never_writes_over_its_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n1,0.5\n")
    assert_fails(run("plot.py", "--log", log, "--out", log, check=False), "--out is --log")
    assert log.read_text() == "epoch,train_loss\n1,0.5\n"


def test_get_data_never_installs_over_its_source(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=1)
    os.remove(f"{source}/test/0.png")  # incomplete, so get_data would install
    before = snapshot(tmp_path)
    proc = run("get_data.py", "--data_dir", source, "--source", source, check=False)
    assert_fails(proc, "--data_dir is --source")
    assert snapshot(tmp_path) == before


def test_checkpoints_never_go_into_the_data(data):
    from TrainUnetDataSet import parse_args, resolve_args

    with pytest.raises(DataError, match="--checkpoint_dir lies inside --data_path"):
        resolve_args(parse_args(["--data_path", f"{data}/train", "--checkpoint_dir", f"{data}/train/ckpt"]), False)


# --- finished runs are kept -----------------------------------------------------------------------


def test_a_new_run_never_replaces_a_finished_one_unless_told(data, trained):
    before = snapshot(trained)
    proc = train_script(f"{data}/train", trained, "--seed", 1, check=False)
    assert_fails(proc, f"{trained}: --checkpoint_dir holds another run", f"--resume {trained}/last", "--overwrite")
    assert snapshot(trained) == before

    train_script(f"{data}/train", trained, "--seed", 1, "--epochs", 2, "--val_slices", 0, "--overwrite")
    assert epochs_in(trained / "log.csv") == [1, 2]
    assert (trained / "best").is_dir() and (trained / "last").is_dir()  # the new run's: val 0 makes best = last


def test_resume_continues_in_the_checkpoints_own_folder(data, trained, tmp_path):
    from TrainUnetDataSet import parse_args, resolve_args

    args = resolve_args(parse_args(["--data_path", f"{data}/train", "--resume", str(trained / "last")]), False)
    assert args.checkpoint_dir == str(trained) and not args.replace_run

    other = tmp_path / "other"
    train_script(f"{data}/train", other)  # a second finished run
    before = snapshot(other)
    proc = train_script(f"{data}/train", other, "--resume", trained / "last", "--epochs", 2, check=False)
    assert_fails(proc, f"{other}: --checkpoint_dir holds another run")
    assert snapshot(other) == before

    flags = ["--data_path", f"{data}/train", "--epochs", 2, *TINY, "--resume", trained / "last"]  # no --checkpoint_dir
    run("TrainUnetDataSet.py", *flags)
    assert epochs_in(trained / "log.csv") == [1, 2]


# --- labels and sizes -----------------------------------------------------------------------------


def test_labels_saved_as_0_1_train_like_0_255(data, tmp_path):
    for name in os.listdir(f"{data}/train/label"):
        path = f"{data}/train/label/{name}"
        cv2.imwrite(path, cv2.imread(path, cv2.IMREAD_GRAYSCALE) // 255)
    out = train_script(f"{data}/train", tmp_path / "ckpt").stdout
    assert "V_rand nan" not in out and FINITE_BEST.search(out.splitlines()[-1])
    assert (tmp_path / "ckpt" / "best").is_dir()


def test_held_out_labels_without_cells_still_leave_a_loadable_best_and_say_why(data, tmp_path):
    from isbi_unet.checkpoint import load_model

    for i in (4, 5):  # the held-out block: all membrane
        cv2.imwrite(f"{data}/train/label/{i}.png", np.zeros((48, 48), np.uint8))
    proc = train_script(f"{data}/train", tmp_path / "ckpt", "--epochs", 2)
    assert "no held-out label has a cell" in proc.stdout.splitlines()[-1]
    assert load_model(str(tmp_path / "ckpt" / "best"))[1]["epoch"] == 2
    assert "is the label inverted" in proc.stderr  # an all-membrane label is also worth a warning


def test_one_empty_held_out_label_does_not_poison_the_score(data, tmp_path):
    cv2.imwrite(f"{data}/train/label/5.png", np.zeros((48, 48), np.uint8))
    assert FINITE_BEST.search(train_script(f"{data}/train", tmp_path / "ckpt").stdout.splitlines()[-1])


def test_a_mostly_membrane_label_is_warned_about_once(data, tmp_path):
    path = f"{data}/train/label/2.png"
    cv2.imwrite(path, 255 - cv2.imread(path, cv2.IMREAD_GRAYSCALE))
    proc = train_script(f"{data}/train", tmp_path / "ckpt")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and path in warnings[0] and "inverted (255 = membrane)" in warnings[0]


def test_evaluate_checks_labels_so_swapped_folders_are_refused(data, trained, tmp_path):
    res = tmp_path / "res"
    predict_script(trained / "best", f"{data}/train/image", res)
    proc = run("evaluate.py", "--prob_dir", f"{data}/train/label", "--label_dir", res / "prob", check=False)
    assert_fails(proc, "not a binary label")


def test_16_bit_images_keep_the_bits_they_use(tmp_path):
    from isbi_unet.images import read_gray

    path = str(tmp_path / "deep.png")
    cv2.imwrite(path, np.array([[0, 1000, 4095]], np.uint16))  # 12-bit data, as many cameras write
    proc = run("-c", f"from isbi_unet.images import read_gray; print(read_gray({path!r}).tolist())")
    assert proc.stdout.strip() == "[[0, 62, 255]]"  # not 0 / 4 / 16 as dividing by 257 would give
    assert "16-bit image scaled to 8-bit (its values use 12 bits" in proc.stderr
    cv2.imwrite(path, np.array([[0, 257 * 100, 65535]], np.uint16))
    assert read_gray(path).tolist() == [[0, 100, 255]]  # full 16-bit data: as before


def different_sizes(data):
    for i in (0, 3):
        image, label = (cv2.imread(f"{data}/train/{k}/{i}.png", cv2.IMREAD_GRAYSCALE) for k in ("image", "label"))
        cv2.imwrite(f"{data}/train/image/{i}.png", cv2.resize(image, (64, 56)))
        cv2.imwrite(f"{data}/train/label/{i}.png", cv2.resize(label, (64, 56), interpolation=cv2.INTER_NEAREST))


def test_slices_of_different_sizes_train_on_crops(data, tmp_path):
    different_sizes(data)
    proc = train_script(f"{data}/train", tmp_path / "ckpt", "--epochs", 2, "--bn_slices", 4)
    assert "epoch   2/2" in proc.stdout and (tmp_path / "ckpt" / "best").is_dir()


def test_whole_slices_of_different_sizes_are_refused_before_training(data, tmp_path):
    different_sizes(data)
    proc = train_script(f"{data}/train", tmp_path / "ckpt", "--crop_size", 0, check=False)
    assert_fails(proc, "training slices differ in size (48x48 ... 64x56)", "--crop_size", "--batch_size 1")
    assert not (tmp_path / "ckpt").exists()
    train_script(f"{data}/train", tmp_path / "one", "--crop_size", 0, "--batch_size", 1)  # one at a time: trains


def test_precise_bn_batches_split_where_the_size_changes():
    from isbi_unet.training import same_size_batches

    arrays = [np.zeros((1, 4, 4))] * 3 + [np.zeros((1, 8, 4))] + [np.zeros((1, 4, 4))]
    assert [b.shape for b in same_size_batches(arrays, 2)] == [(2, 1, 4, 4), (1, 1, 4, 4), (1, 1, 8, 4), (1, 1, 4, 4)]


# --- one line, not a traceback --------------------------------------------------------------------


def test_get_data_from_a_source_without_test_slices(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=0)
    os.rmdir(f"{source}/test")
    proc = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source, check=False)
    assert_fails(proc, f"{source}: no test/")
    assert not os.path.exists(tmp_path / "data" / "train")


def test_plot_of_a_binary_file_and_of_an_infinite_loss(tmp_path):
    binary = tmp_path / "log.csv"
    binary.write_bytes(bytes(range(256)))
    assert_fails(run("plot.py", "--log", binary, check=False), "not a training log")
    binary.write_text("epoch,train_loss,val_loss\n1,0.5,0.6\n2,inf,0.5\n3,0.4,nan\n")
    assert run("plot.py", "--log", binary, "--out", tmp_path / "loss.png").returncode == 0
    assert cv2.imread(str(tmp_path / "loss.png")) is not None
