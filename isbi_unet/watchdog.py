"""Ends a data-parallel process whose training has stopped moving: a frozen peer must not hang the job.

A node that dies ends the job within seconds (OneFlow aborts on the broken socket), but one that is
frozen and still connected (SIGSTOP, a hung driver, a VM paused) leaves every other rank blocked in a
collective forever. The training loop feeds the watchdog at the start of every step (feed()); when no
step has begun for --step_timeout seconds, a thread prints one line naming the epoch and step,

    error: no progress for 1800 s since epoch 3 step 12 began (--step_timeout 1800): ...

and ends the process with exit code 3 (os._exit: the main thread is stuck inside OneFlow). The launcher
then ends the rest of the node (lifeline.py). The time between epochs (precise BN, validation, saving)
counts as part of the epoch's last step, so --step_timeout must exceed one step plus that. Checkpoints
are written kill-safe (checkpoint.py), so `last` stays loadable and --resume continues from it.
Armed only under the launcher: one process has no peer to wait for.
"""

import os
import sys
import threading
import time

STEP_TIMEOUT = 1800.0  # seconds; TrainUnetDataSet's --step_timeout default
EXIT_CODE = 3

_watch = {"thread": None, "stop": None, "last": 0.0, "where": (0, 0)}


def arm(timeout, resume_from):
    """Starts watching; `resume_from` (the `last` checkpoint's path) goes into the line it prints."""
    disarm()
    stop = threading.Event()
    _watch.update(stop=stop, last=time.monotonic(), where=(0, 0))
    thread = threading.Thread(target=_watch_loop, args=(timeout, resume_from, stop), daemon=True, name="watchdog")
    _watch["thread"] = thread
    thread.start()


def feed(epoch, step):
    """A step begins; cheap enough for every step, and a no-op when not armed."""
    _watch["where"] = (epoch, step)
    _watch["last"] = time.monotonic()


def disarm():
    if _watch["stop"] is not None:
        _watch["stop"].set()
        _watch["thread"].join()
    _watch.update(thread=None, stop=None)


def _watch_loop(timeout, resume_from, stop):
    while not stop.wait(min(1.0, timeout / 4)):
        if time.monotonic() - _watch["last"] > timeout:
            epoch, step = _watch["where"]
            where = f"epoch {epoch} step {step} began" if epoch else "training started"
            saved = f"continue with --resume {resume_from}"  # written by global rank 0 only
            if int(os.environ.get("RANK") or 0) == 0 and not os.path.exists(resume_from):
                saved = "no epoch finished, so no checkpoint was saved"
            print(
                f"error: no progress for {timeout:g} s since {where} (--step_timeout {timeout:g}): another "
                f"process of this job stopped responding (a frozen or unreachable node?); stopped, {saved}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_CODE)
