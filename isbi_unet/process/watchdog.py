"""Ends a data-parallel process whose training stopped moving, since a frozen peer would hang the job forever.

A dead node ends the job within seconds (OneFlow aborts on the broken socket), but a frozen one still connected
(SIGSTOP, a hung driver, a paused VM) leaves every other rank blocked in a collective. The training loop calls
feed() as each epoch begins and after each step (session's tick); after --step_timeout seconds without one, a
thread prints

    error: no progress for 1800 s since epoch 3 step 12 ended (--step_timeout 1800): ...

and exits 3 (the main thread is stuck inside OneFlow). The time between epochs (precise BN, validation,
saving) counts as the epoch's last step. Checkpoints are kill-safe, so --resume continues from `last`.
"""

import os
import threading
import time

from isbi_unet.process.runtime import STALLED, exit_now, whoami

_watch = {"thread": None, "stop": None, "last": 0.0, "where": (0, 0)}


def arm(timeout, resume_from):
    """Starts watching; `resume_from()` (the checkpoint a stopped run continues from, or None) goes into the line
    it prints."""
    disarm()
    stop = threading.Event()
    _watch.update(stop=stop, last=time.monotonic(), where=(0, 0))
    thread = threading.Thread(target=_watch_loop, args=(timeout, resume_from, stop), daemon=True, name="watchdog")
    _watch["thread"] = thread
    thread.start()


def armed():
    return _watch["thread"] is not None


def feed(epoch, step):
    """Training moved (an epoch began at step 0, or `step` ended); cheap enough for every step."""
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
            where = f"epoch {epoch} step {step} ended" if step else f"epoch {epoch} began"
            path = resume_from()
            saved = f"continue with --resume {path}"  # written by global rank 0 only
            if path is None or (whoami().rank == 0 and not os.path.exists(path)):
                saved = "no epoch finished, so no checkpoint was saved; the same command starts the run again"
            message = (
                f"no progress for {timeout:g} s since {where} (--step_timeout {timeout:g}): another process of "
                f"this job stopped responding (a frozen or unreachable node?); stopped, {saved}"
            )
            exit_now(message, STALLED, every_rank=True)
