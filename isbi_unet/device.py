"""Which device a script runs on, and how many processes share the work: one rule for every script.

python3 -m isbi_unet.device        # prints the default process count here (train.sh's NPROC)
"""

import os
import re

from isbi_unet.errors import DataError

DEVICES = "auto (cuda if available, else cpu), cpu, cuda or cuda:N"
MAX_CPU_PROCESSES = 4


def select_device(flag="auto", local_rank=0):
    """flow.device for a --device value; asking for a GPU where there is none is a DataError.

    Under the launcher each process takes the GPU of its local rank, unless one is named (cuda:N).
    """
    import oneflow as flow

    if flag not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", flag):
        raise DataError(f"--device must be {DEVICES}; got {flag!r}")
    cuda = flow.cuda.is_available() if flag == "auto" else flag.startswith("cuda")
    if cuda and not flow.cuda.is_available():
        raise DataError(f"--device {flag}: no CUDA device is available")
    if not cuda:
        return flow.device("cpu")
    return flow.device(flag if ":" in flag else f"cuda:{local_rank}")


def default_processes(cuda, limit=None):
    """1 on a GPU; otherwise one per CPU core available, at most MAX_CPU_PROCESSES (and `limit`).

    OneFlow 0.9.0's eager CPU kernels keep about one core busy per process, so a CPU runs at full
    speed with a process per core.
    """
    if cuda:
        return 1
    return max(1, min(MAX_CPU_PROCESSES, len(os.sched_getaffinity(0)), limit or MAX_CPU_PROCESSES))


if __name__ == "__main__":
    import oneflow as flow

    print(default_processes(flow.cuda.is_available()))
