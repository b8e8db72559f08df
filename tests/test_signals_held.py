"""Ctrl-C and SIGTERM during code that swallows exceptions (OneFlow's ONNX converter has bare `except:` clauses)
are held and honoured when it returns: one line, exit 130 or 143, nothing written, no temporary file left."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_dead_rank import wait_until

from conftest import REPO

CODES = {signal.SIGINT: (130, "error: interrupted"), signal.SIGTERM: (143, "error: terminated (SIGTERM)")}


def default_signals():
    """The child starts with default dispositions, whatever this shell job inherited (SIGINT ignored)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def start(args, env=None):
    return subprocess.Popen(
        [sys.executable, "-u", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
        env=env,
    )


SWALLOWER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from isbi_unet.process import run_main, signals_held

    def main():
        with signals_held():
            print("inside", flush=True)
            end = time.time() + 2
            while time.time() < end:  # what the converter does: any exception, KeyboardInterrupt too, swallowed
                try:
                    time.sleep(0.01)
                except:  # noqa: E722
                    pass
            print("returned", flush=True)
        open({out!r}, "w").write("written after the block")

    run_main(main)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_swallowing_block_is_honoured_when_it_returns(tmp_path, signum):
    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWER.format(repo=REPO, out=str(tmp_path / "out.txt")))
    proc = start([script])
    assert proc.stdout.readline() == "inside\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    code, line = CODES[signum]
    assert (proc.returncode, err.strip().splitlines(), out) == (code, [line], "returned\n")
    assert not (tmp_path / "out.txt").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import train_script, write_dataset

    root = tmp_path_factory.mktemp("export")
    data = write_dataset(str(root / "data"))
    train_script(f"{data}/train", root / "ckpt")  # a process: --fast skips these tests here, before any work
    return root


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["Converting model", "Succeed converting model"])  # its first and last line
def test_a_signal_during_the_onnx_conversion_writes_nothing_and_leaves_no_temporary_file(checkpoint, signum, when):
    """At the converter's start, and as it ends (a fixed delay after its start let a fast machine finish the
    whole export before the signal came)."""
    tag = f"{signum}-{when.split()[0]}"
    tmp = checkpoint / f"tmp-{tag}"
    tmp.mkdir()
    out = checkpoint / f"u-{tag}.onnx"
    args = ["export_onnx.py", "--checkpoint", checkpoint / "ckpt" / "last", "--out", out, "--size", 64]
    proc = start([*args, "--check_data", checkpoint / "data" / "test"], env=dict(os.environ, TMPDIR=str(tmp)))
    err = []
    wait_until(lambda: when in (err.append(proc.stderr.readline()) or err[-1]), 120, when)
    proc.send_signal(signum)
    rest = proc.communicate(timeout=120)[1]
    lines = [line for line in (*err, *rest.splitlines()) if line.strip()]
    code, line = CODES[signum]
    assert proc.returncode == code and lines[-1].strip() == line, lines
    assert not any("Traceback" in line for line in lines) and sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists() and os.listdir(tmp) == []
