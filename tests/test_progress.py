"""The per-epoch progress bar: on a terminal (a pseudo-terminal here) with loss and img/s, never in logs."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from conftest import REPO, TINY, run, write_dataset


def run_with_terminal_stderr(*args):
    """Runs `python3 ARGS...` with stderr on a pseudo-terminal, as in an interactive shell; (stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns, as a real terminal has
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stdout = proc.stdout.read()
    assert proc.wait() == 0, b"".join(chunks).decode(errors="replace")
    return stdout, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)  # 19 steps: the bar refreshes
    flags = ["TrainUnetDataSet.py", "--data_path", f"{data}/train", "--epochs", 2, *TINY]
    stdout, terminal = run_with_terminal_stderr(*flags, "--checkpoint_dir", tmp_path / "a")
    assert re.search(r"epoch 2/2: +\d+%.*\d+/38 \[.*[\d.]+img/s, loss=\d+\.\d{4}\]", terminal), terminal
    assert "epoch   2/2" in stdout and "img/s" not in stdout  # the summary line stays on stdout

    proc = run(*flags, "--checkpoint_dir", tmp_path / "b")
    assert "img/s" not in proc.stderr and "\r" not in proc.stderr
