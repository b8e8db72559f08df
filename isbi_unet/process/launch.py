"""`python3 -m isbi_unet.launch`: OneFlow's launcher, same flags, but Ctrl-C stops every rank at the same step and
the job exits with the ranks' own code (2 bad input, 3 stalled, 130 interrupted), not 1 with a traceback.

OneFlow 0.9.0's launcher (oneflow/distributed/launch.py) answers a signal and a failed rank alike, with SIGTERM
to its process group and exit 1, so a terminal's Ctrl-C reaches each rank twice and stops it mid-step. Its
main() runs here with subprocess, signal and os rerouted: ranks start in their own session and get each signal
the launcher gets; a failed rank stops the others at once (after up to GRACE s for them to fail alike on bad
input, so rank 0's line is printed); the exit code is the first failing rank's. The launcher is loaded from its
file, as `import oneflow` takes seconds and installs a SIGINT handler.
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from isbi_unet.process.runtime import BAD_INPUT

GRACE = 10  # seconds; ranks stopping together exit within about one of each other


class Ranks:
    """The ranks OneFlow's launcher starts, and the signals sent to them."""

    def __init__(self):
        self.processes, self.stopping = [], False

    def popen(self, *args, **kwargs):
        self.processes.append(subprocess.Popen(*args, start_new_session=True, **kwargs))
        return self.processes[-1]

    def forward(self, signum, frame=None):
        self.stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def killpg(self, pgid, signum):
        """OneFlow's answer to a failed rank: the others stop at once (measured: a rank whose peer exited aborts
        with a glog stack trace after 10 s), by two signals, since a second SIGTERM pending merges with the first."""
        if self.stopping:  # already stopping on a forwarded signal
            return
        if any(process.poll() == BAD_INPUT for process in self.processes):
            self.wait(GRACE, kill=False)  # every rank checks the same input; only rank 0 says what is wrong
        self.forward(signal.SIGTERM)
        self.forward(signal.SIGINT)

    def wait(self, grace=GRACE, kill=True):
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if kill:
                    process.kill()
                    process.wait()


def oneflow_launcher(ranks):
    """OneFlow's launch.py as a fresh module, its subprocess, signal and os names rerouted to `ranks`."""
    spec = importlib.util.find_spec("oneflow")
    if spec is None or not spec.submodule_search_locations:
        print("error: oneflow is not installed in this Python (source setup.sh first)", file=sys.stderr)
        sys.exit(BAD_INPUT)
    path = os.path.join(spec.submodule_search_locations[0], "distributed", "launch.py")
    module_spec = importlib.util.spec_from_file_location("oneflow_launch", path)
    launch = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(launch)
    launch.subprocess = rerouted(subprocess, Popen=ranks.popen)
    launch.signal = rerouted(signal, signal=lambda signum, handler: None)  # ours, installed first, stay
    launch.os = rerouted(os, killpg=ranks.killpg)
    launch.print = quiet_print
    return launch


def rerouted(module, **names):
    """A stand-in for `module`: its names, with `names` replaced."""
    return SimpleNamespace(**{**vars(module), **names})


def quiet_print(*args, **kwargs):
    """print, without OneFlow's `Killing subprocess PID` lines: the ranks are asked to stop instead."""
    if not (args and str(args[0]).startswith("Killing subprocess")):
        print(*args, **kwargs)


def check_counts(argv):
    """What OneFlow's launcher takes without a word: no processes (it then exits 0 having done nothing), a node
    rank outside the job. One line and exit 2 instead, before any process starts."""
    p = argparse.ArgumentParser(add_help=False)
    for flag, default in (("--nproc_per_node", 1), ("--nnodes", 1), ("--node_rank", 0)):
        p.add_argument(flag, type=int, default=default)
    try:
        counts, _ = p.parse_known_args(argv)
    except SystemExit:  # not a number: OneFlow's own parser says so, with its usage
        return
    for flag in ("nproc_per_node", "nnodes"):
        if getattr(counts, flag) < 1:
            refuse(f"--{flag} must be 1 or more, got {getattr(counts, flag)}")
    if not 0 <= counts.node_rank < counts.nnodes:
        refuse(f"--node_rank must lie in 0..{counts.nnodes - 1} (--nnodes {counts.nnodes}), got {counts.node_rank}")


def refuse(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(BAD_INPUT)


def main():
    check_counts(sys.argv[1:])
    ranks = Ranks()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, ranks.forward)
    launch = oneflow_launcher(ranks)
    try:
        launch.main()
        code = 0
    except subprocess.CalledProcessError as e:
        code = 128 - e.returncode if e.returncode < 0 else e.returncode  # a rank ended by signal N: 128 + N
    except ValueError as e:  # its checks of --master_port and --logdir
        print(f"error: {e}", file=sys.stderr)
        code = BAD_INPUT
    ranks.wait()
    sys.exit(code)


if __name__ == "__main__":
    main()
