"""setup.sh: a clear refusal without a usable Python, and a venv whose activate alone makes OneFlow import."""
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_no_suitable_python_is_a_clear_error(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(REPO, "setup.sh"), repo)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "ls", "sort", "cat", "grep", "sha256sum", "cut", "dirname", "rm"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    # the only Python on PATH is too new for OneFlow 0.9.0 (or, on a 3.7-3.10 CI, pretends to be)
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python3").chmod(0o755)
    proc = subprocess.run(["bash", "-c", "source setup.sh"], cwd=repo, capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert "no CPython 3.7-3.10 found" in proc.stderr and "install Python 3.10" in proc.stderr
    assert not (repo / ".venv").exists()


def test_activated_venv_imports_oneflow_in_a_clean_environment():
    venv = os.path.dirname(os.path.dirname(sys.executable))
    script = f"source {venv}/bin/activate && python3 -c 'import oneflow; print(oneflow.__version__)'"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.9.0"
