"""Ties a rank started by oneflow.distributed.launch to the launcher's life, so a dead rank ends the job.

Measured with OneFlow 0.9.0 on CPU (tests/test_dead_rank.py): when a rank dies the launcher notices
within a second, exits 1, and tries to SIGTERM the other ranks with os.killpg on its own pid. That
kill works only when the launcher leads its process group, as in an interactive shell; started from a
script, a CI job or another program, it fails silently and the other ranks are left behind. Killed
mid-training they abort by themselves (a glog check on the broken socket), but a rank still in
OneFlow's start-up rendezvous (inside `import oneflow`, which waits for every rank) waits forever,
holding its caller's stdout open. With PR_SET_PDEATHSIG the kernel kills a rank when its launcher
exits, whatever the reason.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def under_launcher():
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE") or 1) > 1


def tie_to_launcher():
    """Call before importing oneflow, whose import blocks until all ranks have joined; no-op in a plain run."""
    if not under_launcher() or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not fatal: the job is only as robust as OneFlow's launcher makes it
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)
