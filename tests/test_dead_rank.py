"""Under the real launchers (two CPU ranks), a rank that dies ends the whole job, non-zero, with no rank
left behind: killed mid-training, and killed at start-up while the other rank waits for it inside
`import oneflow`. Under OneFlow's launcher started by another program (so not leading its process group)
that rank was left waiting forever until isbi_unet/process/runtime.py tied each rank to its launcher's life."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, free_port, write_dataset


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return sorted(kids)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def maps(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("launcher", ["oneflow.distributed.launch", "isbi_unet.launch"])
@pytest.mark.parametrize("when", ["start-up", "mid-training"])
def test_a_dead_rank_ends_the_job(tmp_path, when, launcher):
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)
    out = tmp_path / "out.txt"
    cmd = [
        sys.executable,
        "-m",
        launcher,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "TrainUnetDataSet.py",
        "--data_path",
        f"{data}/train",
        "--epochs",
        "50",
        "--checkpoint_dir",
        str(tmp_path / "ckpt"),
        *TINY,
    ]
    # Output to a file, not a pipe: a rank left behind would hold a pipe open and hang the test itself.
    with open(out, "w") as f:
        launcher = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    ranks = []
    try:
        wait_until(lambda: len(children(launcher.pid)) == 2, 60, "two ranks")
        ranks = children(launcher.pid)
        if when == "start-up":
            # Rank 0 has loaded OneFlow's library, so it is inside `import oneflow` (past runtime.join_job)
            # and will wait there for rank 1 to join OneFlow's rendezvous; rank 1 is about as far, not yet joined.
            wait_until(lambda: "liboneflow" in maps(ranks[0]), 60, "rank 0 to load liboneflow")
        else:
            wait_until(lambda: "epoch   1/50" in out.read_text(), 300, "epoch 1")
        os.kill(ranks[1], signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
        wait_until(lambda: not alive(ranks[0]), 30, "rank 0 to exit after the launcher")
    finally:
        for pid in [launcher.pid, *ranks]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
