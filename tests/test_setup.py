"""setup.sh: a clear refusal without a usable Python, and a venv whose activate alone makes OneFlow import and
pins its BLAS kernels."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, assert_fails, path_without_python
from isbi_unet.record import cpu_info


def test_no_suitable_python_is_a_clear_error(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(REPO, "setup.sh"), repo)
    # the only Python on PATH is too new for OneFlow 0.9.0 (or, on a 3.7-3.10 CI, pretends to be)
    bin_dir = path_without_python(tmp_path)
    proc = subprocess.run(
        ["bash", "-c", "source setup.sh"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={"PATH": bin_dir, "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "no CPython 3.7-3.10 found" in proc.stderr and "install Python 3.10" in proc.stderr
    assert not (repo / ".venv").exists()


def activated(command, **env):
    """`command` in bash after sourcing this venv's activate, with nothing else in the environment but env."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    return subprocess.run(
        ["bash", "-c", f"source {venv}/bin/activate && cd {REPO} && {command}"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **env},
    )


def run_activated(command, **env):
    proc = activated(command, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_activated_venv_imports_oneflow_in_a_clean_environment():
    assert run_activated("python3 -c 'import oneflow; print(oneflow.__version__)'").strip() == "0.9.0"


def test_activate_alone_runs_oneflow_quietly_and_without_a_busy_core():
    # the README offers `source .venv/bin/activate` as well as `source setup.sh`: both must run alike
    assert_fails(activated("python3 TrainUnetDataSet.py --epochs -1"), "argument --epochs: must be an integer in 1..")
    env = "echo $GLOG_minloglevel $ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD"
    assert run_activated(env).split() == ["2", "0"]
    assert run_activated(env, GLOG_minloglevel="0", ONEFLOW_VM_COMPUTE_ON_WORKER_THREAD="1").split() == ["0", "1"]


CONV = (
    "import hashlib, os, numpy as np, oneflow as flow; "
    "x = flow.tensor(np.random.default_rng(0).standard_normal((2, 16, 32, 32), dtype=np.float32)); "
    "w = flow.tensor(np.random.default_rng(1).standard_normal((16, 16, 3, 3), dtype=np.float32)); "
    "y = flow._C.conv2d(x, w, None, stride=1, padding=1).numpy(); "
    "print(os.environ.get('OPENBLAS_CORETYPE'), hashlib.sha1(y.tobytes()).hexdigest())"
)


def test_activated_venv_runs_the_same_blas_kernels_on_every_avx2_cpu():
    if not {"avx2", "fma"} <= set(cpu_info()["cpu_simd"]):
        pytest.skip("no AVX2: OpenBLAS keeps the kernels it picks for this CPU")

    def conv(extra=""):
        return run_activated(f'{extra} python3 -c "$CONV"', CONV=CONV, GLOG_minloglevel="2").split()

    pinned = conv()
    # AVX-512 CPUs (with BF16, as here) get kernels whose sums differ in the last bits from the AVX2 ones.
    assert pinned == conv("OPENBLAS_CORETYPE=Haswell") and pinned[0] == "Haswell"
