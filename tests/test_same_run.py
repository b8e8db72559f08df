"""A resumed run is the same run: the data it began with (by content), its log as a spreadsheet may have saved
it, and a command that works after any stop, including one before the first checkpoint."""

import json
import os
import shutil

import cv2
import pytest

from conftest import assert_fails, run, train_in_process, train_script
from isbi_unet.errors import DataError
from isbi_unet.figures import read_log


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """This test's copy of the session's one-epoch run and of its data, its config.json naming the copied data."""
    data, ckpt = shutil.copytree(trained_run.parent / "data", tmp_path / "data"), tmp_path / "ckpt"
    shutil.copytree(trained_run, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(config, data_path=f"{data}/train")))
    return data, ckpt


def resume(ckpt, *flags, checkpoint="last"):
    """`TrainUnetDataSet.py --resume CKPT/last --epochs 2` in this process."""
    return train_in_process("--resume", ckpt / checkpoint, "--epochs", 2, *flags)


def test_a_resume_on_data_changed_in_place_is_refused_naming_what_changed(run_copy):
    data, ckpt = run_copy
    label = os.path.join(data, "train", "label", "1.png")
    cv2.imwrite(label, 255 - cv2.imread(label, cv2.IMREAD_GRAYSCALE))  # same path, same name, other content
    os.remove(os.path.join(data, "train", "image", "5.png"))
    os.remove(os.path.join(data, "train", "label", "5.png"))
    for flags in ([], ["--data_path", f"{data}/train"]):
        with pytest.raises(DataError, match="differ from what the run began with") as e:
            resume(ckpt, *flags)
        assert "label/1.png changed" in str(e.value) and "image/5.png, label/5.png removed" in str(e.value)
    assert json.loads((ckpt / "config.json").read_text()).get("resumed") is None  # nothing written


def test_a_resume_on_the_same_bytes_elsewhere_still_works(run_copy, tmp_path):
    from TrainUnetDataSet import parse_args, resolve_args

    data, ckpt = run_copy
    copy = shutil.copytree(data, tmp_path / "copy")
    shutil.rmtree(data)  # the run's own path gone, its bytes elsewhere
    s = resolve_args(parse_args(["--resume", str(ckpt / "last"), "--data_path", f"{copy}/train"]), cuda=False)
    assert s.data_path == f"{copy}/train" and s.changed["data_path"][1] == f"{copy}/train"


@pytest.mark.parametrize("spreadsheet", ["bom", "lf", "blank lines"])
def test_a_log_saved_by_a_spreadsheet_is_read_and_rewritten_as_training_writes_it(run_copy, spreadsheet):
    from isbi_unet.training import truncate_log  # what a resume runs on the log

    _, ckpt = run_copy
    log = ckpt / "log.csv"
    written = log.read_bytes()  # csv's CRLF rows
    edited = {
        "bom": b"\xef\xbb\xbf" + written,
        "lf": written.replace(b"\r\n", b"\n"),
        "blank lines": written.replace(b"\r\n", b"\r\n,,,\r\n\r\n", 1),
    }[spreadsheet]
    log.write_bytes(edited)
    assert read_log(str(log))["epoch"] == [1.0]
    truncate_log(str(log), 1)
    assert log.read_bytes() == written


def test_a_resume_continues_a_log_with_a_byte_order_mark(run_copy):
    data, ckpt = run_copy
    log = ckpt / "log.csv"
    log.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    run("TrainUnetDataSet.py", "--resume", ckpt / "last", "--epochs", 2)
    rows = log.read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.replace("epoch,", "Epoch,", 1), "not a training log (expected epoch and train_loss columns)"),
        (lambda t: t.replace(",seconds", "", 1), "are not the ones training writes"),
        (lambda t: t.replace("\n1,", "\none,", 1), "line 2: epoch 'one' is not a whole number"),
    ],
)
def test_a_log_whose_columns_were_changed_is_refused_in_one_line(run_copy, edit, message):
    _, ckpt = run_copy
    log = ckpt / "log.csv"
    log.write_text(edit(log.read_text()))
    before = log.read_bytes()
    proc = run("TrainUnetDataSet.py", "--resume", ckpt / "last", "--epochs", 2, check=False)
    assert_fails(proc, f"{log}: ", message)
    assert log.read_bytes() == before and not (ckpt / "last").joinpath("..", ".last.tmp").exists()


def test_a_run_stopped_before_its_first_checkpoint_starts_again_by_the_same_command(run_copy):
    data, ckpt = run_copy
    for name in ("best", "last"):  # what a stop during epoch 1 leaves: config.json (and maybe log.csv)
        shutil.rmtree(ckpt / name)
    (ckpt / "log.csv").unlink()
    train_script(f"{data}/train", ckpt)
    assert (ckpt / "last").is_dir() and (ckpt / "log.csv").read_text().count("\n") == 2


def test_a_kill_between_best_and_last_names_best_and_best_continues(run_copy):
    data, ckpt = run_copy
    shutil.rmtree(ckpt / "last")  # killed after writing best, before last, in epoch 1
    proc = train_script(f"{data}/train", ckpt, check=False)
    assert_fails(proc, "holds another run", f"--resume {ckpt / 'best'}")
    with pytest.raises(DataError, match=f"last: no such checkpoint; continue with --resume {ckpt / 'best'}$"):
        resume(ckpt)
    out = run("TrainUnetDataSet.py", "--resume", ckpt / "best", "--epochs", 2).stdout
    assert "epoch   2/2" in out and (ckpt / "last").is_dir()
