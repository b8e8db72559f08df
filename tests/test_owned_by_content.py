"""The output rules as users meet them (docs/details.md, "What a script may write"): an output is the script's own
by its content, one process writes it at a time, and paths are what they were."""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, assert_fails, predict_script, run, snapshot, train_script, write_dataset


def get_data(data, source, check=True):
    return run("get_data.py", "--data_dir", data, "--source", source, check=check)


def warning_of(proc):
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    return line


@contextlib.contextmanager
def locked(folder):
    """Holds the folder's lock as a running script would, from this test's process."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield f"is being written by process {os.getpid()} ("
    finally:
        os.close(fd)


def record_matches(folder, record):
    """Every file the record lists holds what it says (size and SHA-256)."""
    files = json.loads((folder / record).read_text())["files"]
    return all(
        {"size": (folder / rel).stat().st_size, "sha256": hashlib.sha256((folder / rel).read_bytes()).hexdigest()}
        == entry
        for rel, entry in files.items()
    )


# --- rule 1: ownership by content ------------------------------------------------------------------


def test_get_data_keeps_a_users_slices_copied_over_its_own_names(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=3, n_test=2)
    data = tmp_path / "X"
    get_data(data, source)
    mine = write_dataset(str(tmp_path / "mine"), n_train=3, n_test=0, seed=7)
    for part in ("train/image", "train/label"):
        for name in os.listdir(data / part):
            shutil.copy(f"{mine}/{part}/{name}", data / part / name)
    shutil.rmtree(data / "test")
    before = snapshot(data)
    proc = get_data(data, source)
    assert snapshot(data) == before and not (data / "test").exists()
    assert f"{data}/train/image" in warning_of(proc) and "changed since" in warning_of(proc)


def test_get_data_keeps_a_users_own_test_slices_under_its_names(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=6)
    data = tmp_path / "X"
    get_data(data, source)
    shutil.rmtree(data / "train")
    for name in os.listdir(data / "test"):
        os.remove(data / "test" / name)
    mine = write_dataset(str(tmp_path / "mine"), n_train=0, n_test=5, seed=7)
    for i in range(5):
        shutil.copy(f"{mine}/test/{i}.png", data / "test" / f"{i}.png")
    before = snapshot(data)
    proc = get_data(data, source)
    assert snapshot(data) == before and sorted(os.listdir(data / "test")) == [f"{i}.png" for i in range(5)]
    assert f"{data}/test" in warning_of(proc)


def test_get_data_refills_its_own_untouched_slices(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=2)
    data = tmp_path / "X"
    get_data(data, source)
    shutil.rmtree(data / "test")  # its own data, incomplete: filled again
    assert "2 test slices" in get_data(data, source).stdout
    assert record_matches(data, ".get_data.json")


@pytest.mark.parametrize("place", ["prob/mine.txt", "overlay/notes.txt"])
@pytest.mark.slow
def test_a_rerun_of_predict_keeps_a_users_file_in_a_sub_folder(data, trained, tmp_path, place):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    run("visualize.py", "--res_path", res, "--n", 2)
    (res / place).write_text("mine")
    before = snapshot(res)
    assert_fails(predict_script(trained / "best", f"{data}/test", res, check=False), res, place, "--overwrite")
    assert snapshot(res) == before
    predict_script(trained / "best", f"{data}/test", res, "--overwrite")  # beside it: kept
    assert (res / place).read_text() == "mine" and record_matches(res, "run.json")


def test_a_hand_corrected_mask_is_never_replaced(data, trained, tmp_path):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    corrected = shutil.copy(f"{data}/train/label/0.png", tmp_path / "corrected.png")
    shutil.copy(corrected, res / "1.png")
    before = snapshot(res)
    assert_fails(predict_script(trained / "best", f"{data}/test", res, check=False), "1.png (changed since written)")
    proc = predict_script(trained / "best", f"{data}/test", res, "--overwrite", check=False)
    assert_fails(proc, f"{res}/1.png", "was changed since it was written")
    assert snapshot(res) == before


def test_a_figure_kept_under_another_name_is_the_users(data, trained, tmp_path):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    run("visualize.py", "--res_path", res, "--n", 2)
    shutil.copy(res / "figure.png", res / "best_figure.png")
    assert_fails(predict_script(trained / "best", f"{data}/test", res, check=False), "best_figure.png")
    predict_script(trained / "best", f"{data}/test", res, "--overwrite")
    assert (res / "best_figure.png").exists()
    assert not (res / "figure.png").exists() and not (res / "overlay").exists()  # drawn from the old results


def test_a_replaced_run_keeps_a_log_the_user_edited(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt)
    with open(ckpt / "log.csv", "a") as f:
        f.write("my note\n")
    before = snapshot(ckpt)
    proc = train_script(f"{data}/train", ckpt, "--overwrite", check=False)
    assert_fails(proc, f"{ckpt}/log.csv", "was changed since the run wrote it")
    assert snapshot(ckpt) == before


def test_a_users_file_inside_a_checkpoint_is_not_deleted_by_the_next_save(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt)
    (ckpt / "best" / "notes.txt").write_text("mine")
    proc = run("TrainUnetDataSet.py", "--resume", ckpt / "last", "--epochs", 2, check=False)
    assert_fails(proc, f"{ckpt}/best/notes.txt", "was not written by the run")
    assert (ckpt / "best" / "notes.txt").read_text() == "mine"


def test_results_of_an_earlier_version_are_refused_saying_why(data, trained, tmp_path):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    record = json.loads((res / "run.json").read_text())
    del record["files"]  # as records were before they listed digests: names only
    (res / "run.json").write_text(json.dumps(record))
    before = snapshot(res)
    proc = predict_script(trained / "best", f"{data}/test", res, check=False)
    assert_fails(proc, res, "earlier version of this script", "no digests")
    assert snapshot(res) == before


# --- rule 2: one writer at a time ------------------------------------------------------------------


def test_a_prediction_into_a_folder_being_written_is_refused_naming_the_writer(data, trained, tmp_path):
    res = tmp_path / "R"
    with locked(res) as holder:
        assert_fails(predict_script(trained / "best", f"{data}/test", res, check=False), res, holder, "pytest")
        assert os.listdir(res) == []
    predict_script(trained / "best", f"{data}/test", res)  # released: as any other run


def test_visualize_and_get_data_refuse_a_folder_being_written(data, trained, tmp_path):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    with locked(res / "overlay") as holder:
        assert_fails(run("visualize.py", "--res_path", res, check=False), res / "overlay", holder)
    target = tmp_path / "X"
    with locked(target) as holder:
        assert_fails(get_data(target, data, check=False), target, holder)
        assert os.listdir(target) == []


@pytest.mark.parametrize("resume", [False, True])
def test_a_training_into_a_run_folder_being_written_is_refused(data, trained, tmp_path, resume):
    ckpt = trained if resume else tmp_path / "new"
    before = snapshot(ckpt) if resume else {}
    with locked(ckpt) as holder:
        if resume:
            proc = run("TrainUnetDataSet.py", "--resume", ckpt / "last", "--epochs", 2, check=False)
        else:
            proc = train_script(f"{data}/train", ckpt, check=False)
        assert_fails(proc, ckpt, holder)
        assert snapshot(ckpt) == before


def start(*args):
    return subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_predictions_at_once_never_mix(data, trained, tmp_path):
    """Started together: one writes and the other is refused, or (if one ended before the other began) the later
    replaces the earlier as a whole. Either way the record describes the masks in the folder."""
    other = write_dataset(str(tmp_path / "other"), n_train=0, n_test=3, seed=5)
    res = tmp_path / "R"
    procs = [
        start(
            "predict_unet_test.py", "--checkpoint", trained / "best", "--Test_Data_path", images, "--save_res_path", res
        )
        for images in (f"{data}/test", f"{other}/test")
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, stderr in results:
        assert code == 0 or (code == 2 and "is being written by process" in stderr), stderr
    assert any(code == 0 for code, _ in results)
    record = json.loads((res / "run.json").read_text())
    assert record["finished"] is True and record_matches(res, "run.json")
    assert sorted(record["files"]) == sorted(
        os.path.relpath(p, res) for p in map(str, res.rglob("*.*")) if not p.endswith("run.json")
    )


def test_two_trainings_at_once_into_one_new_folder(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = ["--data_path", f"{data}/train", "--epochs", 1, "--checkpoint_dir", ckpt, *TINY]
    procs = [start("TrainUnetDataSet.py", *flags, "--seed", seed) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results  # the lock, or the finished run, refuses one
    (winner,) = [seed for seed, (code, _) in zip((1, 2), results) if code == 0]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["seed"] == winner and len((ckpt / "log.csv").read_text().splitlines()) == 2


# --- rule 3: paths are what they were --------------------------------------------------------------


def test_visualize_finds_the_slices_a_prediction_named_relative_to_where_it_ran(data, trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(data, work / "data")
    script = os.path.join(REPO, "predict_unet_test.py")
    args = ["--checkpoint", trained / "best", "--Test_Data_path", "data/test", "--save_res_path", "R"]
    subprocess.run([sys.executable, script, *map(str, args)], cwd=work, check=True, capture_output=True)
    run("visualize.py", "--res_path", work / "R", "--n", 2)  # from the repo, elsewhere
    assert sorted(os.listdir(work / "R" / "overlay")) == ["0.png", "1.png", "overlay.json"]


def test_no_output_is_written_through_a_link_planted_at_its_temporary_name(data, trained, tmp_path):
    res = tmp_path / "R"
    predict_script(trained / "best", f"{data}/test", res)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not to be written")
    for name in (".0.tmp.png", "prob/.0.tmp.png"):
        os.symlink(victim, res / name)
    predict_script(trained / "best", f"{data}/test", res, "--overwrite")
    assert victim.read_bytes() == b"not to be written"
    assert os.path.islink(res / ".0.tmp.png") and record_matches(res, "run.json")


def test_a_sub_folder_linked_to_an_input_is_refused_like_the_folder(data, trained, tmp_path):
    res = tmp_path / "R"
    res.mkdir()
    os.symlink(f"{data}/test", res / "prob")
    before = snapshot(data)
    proc = predict_script(trained / "best", f"{data}/test", res, "--overwrite", check=False)
    assert_fails(proc, f"{res}/prob: --save_res_path is --Test_Data_path")
    assert snapshot(data) == before


def test_a_checkpoint_copied_on_its_own_finds_its_relative_data_from_anywhere(tmp_path):
    work = tmp_path / "work"
    write_dataset(str(work / "data"))
    script = os.path.join(REPO, "TrainUnetDataSet.py")
    args = ["--data_path", "data/train", "--epochs", 1, "--checkpoint_dir", "ckpt", *TINY]
    subprocess.run([sys.executable, script, *map(str, args)], cwd=work, check=True, capture_output=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copytree(work / "ckpt" / "last", alone / "last")  # without its config.json
    proc = run("TrainUnetDataSet.py", "--resume", alone / "last", "--epochs", 2, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   2/2" in proc.stdout
