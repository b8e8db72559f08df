"""OneFlow's launcher, stopping cleanly: Ctrl-C stops every rank at one step, and exits with the ranks' code.

    python3 -m isbi_unet.launch --nproc_per_node 2 TrainUnetDataSet.py ARGS   # any oneflow.distributed.launch flag

OneFlow 0.9.0's own launcher (oneflow/distributed/launch.py) turns a rank's non-zero exit into a
CalledProcessError traceback and exit 1, and on SIGINT or SIGTERM sends SIGTERM to its process group with
os.killpg and exits 1 (lifeline.py then SIGKILLs the ranks). This runs that launcher's main() with three
changes, made through the names its module looks up:

- Ranks start in their own session (`subprocess.Popen(..., start_new_session=True)`), so a terminal's
  Ctrl-C reaches the launcher only, which forwards every SIGINT / SIGTERM it gets to every rank once:
  the first stops training at the next step (isbi_unet/interrupt.py), a second stops it at once.
- Its `signal.signal(SIGINT / SIGTERM, ...)` calls are ignored (the forwarding handler is installed first),
  and its os.killpg of the launcher's group, its response to a failed rank, becomes two signals to each
  other rank (unless they are already stopping on a forwarded one): they stop at once, silently. A rank
  that failed on bad input (exit 2) first gets the others up to GRACE seconds to fail alike, so rank 0's
  one line is printed.
- After a rank's non-zero exit it waits for the others (killing any still alive after GRACE seconds) and
  exits with the first failing rank's code (128 + N for a rank ended by signal N), with no traceback.
  Only rank 0 prints errors (errors.run_main).

OneFlow's launcher module is loaded from its file, without `import oneflow`: the launcher needs none of
it, and the package's import takes seconds and installs a SIGINT handler.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

GRACE = 10  # seconds; ranks stopping together exit within about one of each other
BAD_INPUT = 2  # errors.run_main's exit code for bad input, which every rank finds by itself
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Ranks:
    """The ranks OneFlow's launcher starts, and the signals sent to them."""

    def __init__(self):
        self.processes, self.stopping = [], False

    def popen(self, *args, **kwargs):
        process = subprocess.Popen(*args, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def forward(self, signum, frame=None):
        self.stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def killpg(self, pgid, signum):
        """OneFlow's response to a failed rank: the others stop at once, as after a second Ctrl-C.

        They cannot finish a step without it (measured: a rank waiting for a peer that exited aborts with a
        glog stack trace after 10 s). Two different signals, since a second SIGTERM still pending merges with the
        first. Nothing is sent when the ranks are already stopping on a forwarded signal.
        """
        if self.stopping:
            return
        if any(process.poll() == BAD_INPUT for process in self.processes):
            # Every rank checks the same flags and files, and only rank 0 prints: give it time to say what is wrong.
            self.wait(GRACE, kill=False)
        self.forward(signal.SIGTERM)
        self.forward(signal.SIGINT)

    def wait(self, grace=GRACE, kill=True):
        deadline = time.time() + grace
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                if kill:
                    process.kill()
                    process.wait()


class Shim(SimpleNamespace):
    """A stand-in for a module: the given names replaced, every other name the module's own."""

    def __init__(self, module, **replaced):
        super().__init__(**replaced)
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def oneflow_launcher(ranks):
    """OneFlow's launch.py as a fresh module, with its subprocess, signal and os names rerouted to `ranks`."""
    spec = importlib.util.find_spec("oneflow")
    if spec is None or not spec.submodule_search_locations:
        print("error: oneflow is not installed in this Python (source setup.sh first)", file=sys.stderr)
        sys.exit(2)
    path = os.path.join(spec.submodule_search_locations[0], "distributed", "launch.py")
    module_spec = importlib.util.spec_from_file_location("oneflow_launch", path)
    launch = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(launch)
    launch.subprocess = Shim(subprocess, Popen=ranks.popen)
    launch.signal = Shim(signal, signal=lambda signum, handler: None)
    launch.os = Shim(os, killpg=ranks.killpg)
    launch.print = quiet_print
    return launch


def quiet_print(*args, **kwargs):
    """print, without OneFlow's `Killing subprocess PID` lines: the ranks are asked to stop instead."""
    if not (args and str(args[0]).startswith("Killing subprocess")):
        print(*args, **kwargs)


def exit_code(returncode):
    return 128 - returncode if returncode < 0 else returncode


def main():
    ranks = Ranks()
    for s in SIGNALS:
        signal.signal(s, ranks.forward)
    launch = oneflow_launcher(ranks)
    try:
        launch.main()
        code = 0
    except subprocess.CalledProcessError as e:
        code = exit_code(e.returncode)
    except ValueError as e:  # its checks of --master_port and --logdir
        print(f"error: {e}", file=sys.stderr)
        code = 2
    ranks.wait()
    sys.exit(code)


if __name__ == "__main__":
    main()
