"""setup.sh --torch: the side venv with CPU torch for the bioimage.io package's PyTorch weights."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO, path_without_python


def test_no_python_for_torch_is_a_clear_error_and_makes_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("setup.sh", "torch-requirements.txt"):
        shutil.copy(os.path.join(REPO, name), repo)
    # the only Python on PATH is too old for torch's CPU wheels (or, on a 3.11+ machine, pretends to be)
    bin_dir = path_without_python(tmp_path)
    proc = subprocess.run(
        ["bash", "setup.sh", "--torch"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={"PATH": bin_dir, "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "no CPython 3.11+ found for .venv-torch" in proc.stderr and "TORCH_BASE_PYTHON" in proc.stderr
    assert not (repo / ".venv-torch").exists() and not (repo / ".venv").exists()  # the project venv is not made


def test_the_torch_venv_is_up_to_date_and_has_what_the_export_runs():
    """CI runs bash setup.sh --torch first: here it finds .venv-torch current (the hash of its pins) and ready."""
    if not os.path.exists(os.path.join(REPO, ".venv-torch")):
        if os.environ.get("ISBI_UNET_REQUIRE_TORCH"):
            pytest.fail(".venv-torch is missing: bash setup.sh --torch")
        pytest.skip("no .venv-torch here (bash setup.sh --torch makes it, 1.5 GB): not made by a test")
    proc = subprocess.run(["bash", "setup.sh", "--torch"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stderr and ".venv-torch is ready" in proc.stderr
    python = os.path.join(REPO, ".venv-torch", "bin", "python")
    code = "import sys, torch, bioimageio.core, onnxruntime; print(sys.version_info[:2] >= (3, 11), torch.__version__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    assert out[0] == "True" and out[1].startswith("2.13.0")
