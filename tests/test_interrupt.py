"""Nothing a user can cause ends in a traceback: Ctrl-C stops training at a step boundary (one process and
under isbi_unet.launch), a second Ctrl-C stops it at once, Ctrl-C during start-up (inside `import oneflow`,
or while the launcher waits for other nodes) is one line, a bad flag under the launcher is one line, and a
full disk while saving keeps the previous checkpoints."""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_dead_rank import alive, children, maps, wait_until
from test_multinode import listening
from test_resume import read_epochs, start_training, wait_for_epoch_line, weights

from conftest import ONEFLOW_LOG, REPO, TINY, assert_fails, free_port, run, write_dataset
from isbi_unet.process.interrupt import NOT_SAVED

INTERRUPTED = r"error: interrupted at epoch (\d+) step (\d+); continue with --resume (\S+)"


def stderr_lines(stderr):
    return [
        line for line in stderr.splitlines() if "libibverbs not available" not in line and not ONEFLOW_LOG.match(line)
    ]


def assert_interrupted(proc, stderr, ckpt, steps_per_epoch):
    """Exit 130, the one line naming `last`, no hidden leftovers, and `last` loads at an epoch that fits it."""
    assert proc.returncode == 130, stderr
    lines = stderr_lines(stderr)
    assert len(lines) == 1, stderr
    epoch, step, resume = re.fullmatch(INTERRUPTED, lines[0]).groups()
    assert resume == str(ckpt / "last") and 1 <= int(step) <= steps_per_epoch
    assert not [name for name in os.listdir(ckpt) if name.startswith(".")]  # no .last.tmp or .last.old
    saved = weights(ckpt / "last")[0]
    assert saved == (int(epoch) if int(step) == steps_per_epoch else int(epoch) - 1) and saved >= 1
    return saved


def test_ctrl_c_stops_between_steps_and_resume_finishes(tmp_path):
    # 38 training slices in batches of 2: epochs of 19 steps.
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)
    ckpt = tmp_path / "ckpt"
    flags = ["--data_path", f"{data}/train", "--epochs", 5, "--checkpoint_dir", ckpt, *TINY]
    proc = start_training(*flags)
    time.sleep(wait_for_epoch_line(proc, 1) / 4)  # into epoch 2's steps
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    saved = assert_interrupted(proc, stderr, ckpt, 19)
    assert saved < 5  # it stopped early, not at the end

    out = run("TrainUnetDataSet.py", *flags, "--resume", ckpt / "last").stdout
    assert re.findall(r"epoch +(\d+)/5", out) == [str(e) for e in range(saved + 1, 6)]
    assert read_epochs(ckpt / "log.csv") == list(range(1, 6))


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_ctrl_c_under_the_launcher_stops_every_rank(tmp_path, target):
    """SIGINT to the launcher is forwarded to the ranks; SIGINT to rank 1 alone stops rank 0 too (all_reduce)."""
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)
    ckpt = tmp_path / "ckpt"
    launch = ["-m", "isbi_unet.launch", "--nproc_per_node", "2", "--master_port", str(free_port())]
    flags = ["--data_path", f"{data}/train", "--epochs", "50", "--checkpoint_dir", str(ckpt), *TINY]
    cmd = [sys.executable, *launch, "TrainUnetDataSet.py", *flags]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = children(launcher.pid)
    try:
        wait_for_epoch_line(launcher, 1)
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        os.kill(launcher.pid if target == "launcher" else ranks[1], signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
        assert "Traceback" not in stderr
        # 38 slices over 2 ranks in batches of 2: 10 steps per epoch.
        assert_interrupted(launcher, stderr, ckpt, 10)
        wait_until(lambda: not any(alive(pid) for pid in ranks), 10, "both ranks to exit")
    finally:
        for pid in [launcher.pid, *ranks]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


START_UP = "error: interrupted during start-up; nothing was written"


def stop_inside_oneflow_import(pid, timeout=120):
    """SIGSTOP `pid` the moment OneFlow's C++ library is mapped: inside `import oneflow`, which then runs about
    half a second more of Python (where OneFlow's own SIGINT handler, installed meanwhile, ended the process
    silently with exit 255, a hang or an ImportError traceback)."""
    deadline = time.time() + timeout
    while "_oneflow_internal" not in maps(pid):
        assert time.time() < deadline, f"oneflow's library not loaded by pid {pid} within {timeout} s"
        time.sleep(0.002)
    os.kill(pid, signal.SIGSTOP)


@pytest.mark.parametrize("script", ["TrainUnetDataSet.py", "predict_unet_test.py"])
def test_ctrl_c_inside_import_oneflow_is_one_line_and_exit_130(data, trained, tmp_path, script):
    out = tmp_path / "out"
    flags = {
        "TrainUnetDataSet.py": ["--data_path", f"{data}/train", "--checkpoint_dir", out, *TINY, "--epochs", 1],
        "predict_unet_test.py": [
            "--checkpoint",
            trained / "best",
            "--Test_Data_path",
            f"{data}/test",
            "--save_res_path",
            out,
        ],
    }[script]
    cmd = [sys.executable, script, *map(str, flags)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stop_inside_oneflow_import(proc.pid)
        proc.send_signal(signal.SIGINT)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr_lines(stderr), stdout) == (130, [START_UP], ""), stderr
    assert not out.exists()


def test_ctrl_c_while_node_0_waits_for_the_others_is_one_line_and_exit_130(data, tmp_path):
    port = free_port()
    node = ["--nnodes", "2", "--node_rank", "0", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
    flags = ["--data_path", f"{data}/train", "--checkpoint_dir", str(tmp_path / "ckpt"), *TINY]
    cmd = [sys.executable, "-m", "isbi_unet.launch", *node, "--master_port", str(port), "TrainUnetDataSet.py", *flags]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: listening(port), 120, "node 0 to wait for node 1")
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert (launcher.returncode, stderr_lines(stderr)) == (130, [START_UP]), stderr
    assert not (tmp_path / "ckpt").exists()


def test_a_bad_flag_under_the_launcher_is_one_line_and_exit_2(data, tmp_path):
    launch = ["-m", "isbi_unet.launch", "--nproc_per_node", 2, "--master_port", free_port()]
    flags = ["--data_path", f"{data}/train", "--checkpoint_dir", tmp_path / "ckpt", *TINY, "--epochs", 0]
    proc = run(*launch, "TrainUnetDataSet.py", *flags, check=False, timeout=120)
    assert_fails(proc, "argument --epochs: must be an integer in 1..")


NAN_ON_RANK_1 = """
import sys
sys.path.insert(0, {repo!r})
import TrainUnetDataSet
import oneflow as flow
from isbi_unet import engine
from isbi_unet.process import run_main

steps = 0
real_step = engine.EagerEngine.train_step


def train_step(self, *batch):  # a whole real step (its gradients all-reduced), then rank 1 alone sees a NaN loss
    global steps
    steps += 1
    loss = real_step(self, *batch)
    return loss * float("nan") if flow.env.get_rank() == 1 and steps == 2 else loss


engine.EagerEngine.train_step = train_step
run_main(TrainUnetDataSet.main)
"""


def test_a_nan_loss_seen_by_one_rank_stops_every_rank_with_one_line(tmp_path):
    # Rank 0, the one that prints, must say why: rank 1 stopping alone left it waiting, then "interrupted".
    data = write_dataset(str(tmp_path / "data"), n_train=20, n_test=1)
    worker = tmp_path / "nan_on_rank_1.py"
    worker.write_text(NAN_ON_RANK_1.format(repo=REPO))
    launch = ["-m", "isbi_unet.launch", "--nproc_per_node", 2, "--master_port", free_port()]
    flags = ["--data_path", f"{data}/train", "--checkpoint_dir", tmp_path / "ckpt", *TINY, "--epochs", 2]
    proc = run(*launch, worker, *flags, check=False, timeout=300)
    assert_fails(proc, "epoch 1 step 2: loss is not finite on 1 of 2 processes; stopped, no checkpoint was saved")
    assert not (tmp_path / "ckpt" / "last").exists()


def stop_signals_script(body):
    """A process holding StopSignals at epoch 3 step 7 (no OneFlow needed), running BODY."""
    script = """
        import time
        from isbi_unet.process.interrupt import StopSignals
        with StopSignals(position=(3, 7)) as stop:
    """
    script = textwrap.dedent(script) + textwrap.indent(textwrap.dedent(body), " " * 4)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("saving", [False, True])
def test_a_second_signal_stops_at_once_but_lets_a_save_finish(saving):
    # The main thread is busy (as inside a long OneFlow step) and never reaches a check.
    # "ready" inside the protected block when saving: a signal sent before it is entered would stop at once
    body = (
        "with stop.protected():\n    print('ready', flush=True)\n    time.sleep(1.5)\n    print('saved', flush=True)\n"
        if saving
        else "print('ready', flush=True)\n"
    )
    proc = stop_signals_script(body + "time.sleep(60)\n")
    assert proc.stdout.readline() == b"ready\n"
    start = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    elapsed = time.time() - start
    assert proc.returncode == 130 and elapsed < 10 and (elapsed > 1.2) == saving
    assert err.decode().strip() == "error: interrupted at epoch 3 step 7 (stopped at once); " + NOT_SAVED
    assert (b"saved" in out) == saving


def test_one_signal_is_a_request_that_check_raises():
    from isbi_unet.process import Interrupted
    from isbi_unet.process.interrupt import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals(position=(2, 4)) as stop:
        stop.resume_from = "ckpt/last"
        stop.check()  # nothing yet
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: stop.count == 1, 5, "the watcher to count the signal")
        with pytest.raises(Interrupted, match=r"^interrupted at epoch 2 step 5; continue with --resume ckpt/last$"):
            stop.check(2, 5)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """In-process (any machine): flow.save writes part of the checkpoint, then the disk is full."""
    import oneflow as flow

    import isbi_unet.checkpoint as checkpoint
    from isbi_unet.errors import WriteError
    from unet import UNet

    model, last = UNet(width=4), str(tmp_path / "last")
    checkpoint.save_checkpoint(last, model, epoch=1)

    def full_disk(state, path):
        os.makedirs(path)
        open(os.path.join(path, "pickled_data"), "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(flow, "save", full_disk)
    with pytest.raises(WriteError, match=r"last: cannot write \(No space left on device\)$"):
        checkpoint.save_checkpoint(last, model, epoch=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last"]
    assert checkpoint.load_checkpoint(last)["epoch"] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk (root and a sandbox that allows mounts), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; test_a_failed_save_keeps_the_previous_checkpoint simulates it")
    yield disk
    subprocess.run(["umount", disk], check=True)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_epoch(small_disk, tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=8, n_test=1)
    ckpt = small_disk / "ckpt"
    flags = ["--data_path", f"{data}/train", "--checkpoint_dir", ckpt, *TINY]
    run("TrainUnetDataSet.py", *flags, "--epochs", 1)
    used = os.statvfs(small_disk).f_blocks - os.statvfs(small_disk).f_bfree
    # Room for what epoch 1 wrote plus a third of a checkpoint: epoch 2's first new checkpoint cannot fit.
    room = used * os.statvfs(small_disk).f_frsize // 1024 + 800
    subprocess.run(["mount", "-o", f"remount,size={room}k", small_disk], check=True)
    proc = run("TrainUnetDataSet.py", *flags, "--epochs", 3, "--resume", ckpt / "last", check=False)
    assert_fails(proc, "cannot write (No space left on device); last good checkpoint is " + str(ckpt / "last"))
    assert re.match(rf"error: {ckpt}/(best|last): ", stderr_lines(proc.stderr)[0])
    assert sorted(os.listdir(ckpt)) == ["best", "config.json", "last", "log.csv", "loss.png"]  # no .NAME.tmp
    assert weights(ckpt / "last")[0] == 1 and weights(ckpt / "best")[0] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_prediction_is_one_line_and_exit_130(trained_run, tmp_path, workers):
    data = write_dataset(str(tmp_path / "data"), n_train=0, n_test=60, size=(96, 96))
    res = tmp_path / "res"
    flags = ["--checkpoint", trained_run / "best", "--Test_Data_path", f"{data}/test", "--save_res_path", res]
    cmd = [sys.executable, "predict_unet_test.py", *map(str, flags), "--tta", "--workers", str(workers)]
    # its own session, so that a signal to its group is what a terminal's Ctrl-C sends (parent and workers)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_until(lambda: os.path.isdir(res / "prob") and len(os.listdir(res / "prob")) >= 2, 120, "two slices done")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr_lines(stderr) == ["error: interrupted"], stderr
    assert len(os.listdir(res / "prob")) < 60  # it stopped, rather than finishing


def converter_running(parent):
    """Whether `parent` has a child converting a checkpoint to ONNX (isbi_unet/predictor.py's convert_checkpoint)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"isbi_unet.onnx_export" in command:
            return True
    return False


def test_ctrl_c_while_a_checkpoint_is_converted_is_one_line_and_leaves_nothing(trained_run, tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=0, n_test=2, size=(64, 64))
    res, scratch = tmp_path / "res", tmp_path / "tmp"
    scratch.mkdir()
    flags = ["--checkpoint", trained_run / "best", "--Test_Data_path", f"{data}/test", "--save_res_path", res]
    cmd = [sys.executable, "predict_unet_test.py", *map(str, flags), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    wait_until(lambda: converter_running(proc.pid), 120, "the converter started")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the script and its converter
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr_lines(stderr) == ["error: interrupted"], stderr
    assert not res.exists() and os.listdir(scratch) == []


def test_ctrl_c_during_the_last_validation_exits_130_with_the_run_complete(data, tmp_path, monkeypatch):
    import TrainUnetDataSet
    from isbi_unet.checkpoint import load_checkpoint
    from isbi_unet.process import Interrupted

    real = TrainUnetDataSet.evaluate

    def evaluate_then_ctrl_c(engine, val_set, criterion, device, epoch):
        scores = real(engine, val_set, criterion, device, epoch)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # for the signal watcher to count it
        return scores

    monkeypatch.setattr(TrainUnetDataSet, "evaluate", evaluate_then_ctrl_c)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted, match="after the last epoch was saved"):
        TrainUnetDataSet.main(["--data_path", f"{data}/train", "--epochs", "2", "--checkpoint_dir", str(ckpt), *TINY])
    assert read_epochs(ckpt / "log.csv") == [1, 2]
    assert load_checkpoint(str(ckpt / "last"), "cpu")["epoch"] == 2
