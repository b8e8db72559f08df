"""What produced a result: versions, device, code commit, host, command line and time, as one dict.

Training merges it into checkpoint_dir/config.json and prediction writes it to save_res_path/run.json,
so a checkpoint or a mask can be traced to the code and machine that made it.
"""

import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys

from isbi_unet.errors import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(repo=REPO):
    """(commit, dirty) of the checkout holding the code; ("unknown", None) outside git or without git.

    dirty: tracked files differ from the commit (untracked data and checkpoints do not count).
    """

    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def cuda_record():
    import oneflow as flow

    build = flow._oneflow_internal.flags.cuda_version() if flow._oneflow_internal.flags.with_cuda() else 0
    record = {"oneflow_cuda_build": f"{build // 1000}.{build % 1000 // 10}" if build else "none (CPU-only build)"}
    if flow.cuda.is_available():
        record["gpus"] = [flow.cuda.get_device_name(i) for i in range(flow.cuda.device_count())]
    else:
        record["gpus"] = []
    return record


def cpu_info():
    """'model, N logical cores' and the SIMD flags that decide which kernels OpenBLAS and NumPy run."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return {
        "cpu": f"{names[0] if names else platform.machine()}, {os.cpu_count()} logical cores",
        "cpu_simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags],
        # OpenBLAS's kernels decide the trained weights; setup.sh pins them on AVX2 CPUs.
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE") or "chosen by CPU",
    }


def run_record(device=None, repo=REPO):
    import cv2
    import numpy
    import oneflow as flow

    commit, dirty = git_state(repo)
    return {
        "python": platform.python_version(),
        "oneflow": flow.__version__,
        "oneflow_git": getattr(flow, "__git_commit__", "unknown"),
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        **({"device": str(device)} if device is not None else {}),
        **cuda_record(),
        **cpu_info(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json_record(path, fields, device=None):
    """Writes `fields` together with run_record(device) to the JSON file `path`."""
    record = {**fields, **run_record(device)}
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)
