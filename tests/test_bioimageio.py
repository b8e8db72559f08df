"""bioimage.io packages: export_onnx.py --bioimageio, bioimageio.core's own test offline, and the .zip read back."""

import os
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest

from conftest import REPO, assert_fails, predict_script, run, write_dataset

pytest.importorskip("onnxruntime")  # requirements-onnx.txt and -bioimageio.txt install only on CPython 3.10+
pytest.importorskip("bioimageio.core")
from ruyaml import YAML  # noqa: E402  (comes with bioimageio.spec)

from isbi_unet import bioimageio as bio  # noqa: E402


def offline_prefix():
    """`unshare -n` (no network at all) where this machine allows it, as CI has no network either."""
    try:
        ok = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-n"] if ok else None


def run_offline(*args, check=True):
    """`python3 ARGS...` in the repo with no network; skipped, saying why, where that cannot be arranged."""
    prefix = offline_prefix()
    if prefix is None:
        pytest.skip("unshare -n is not permitted here, so 'no network' cannot be enforced")
    proc = subprocess.run(
        [*prefix, sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    # OneFlow's nn.Graph compilation logs one glog line about the missing CUDA driver; it is not ours.
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if "cuda_device_manager" not in line)
    return proc


@pytest.fixture(scope="session")
def check_data(tmp_path_factory):
    """128x128 slices: the package's smallest declared size is 112 (twice the 48 px halo, plus 16)."""
    return write_dataset(str(tmp_path_factory.mktemp("bio_data")), n_train=0, n_test=2, size=(128, 128)) + "/test"


@pytest.fixture(scope="session")
def package(trained_run, check_data, tmp_path_factory):
    """trained_run's best checkpoint as a package, built by the real script with no network."""
    out = tmp_path_factory.mktemp("bio") / "tiny.zip"
    args = ["--checkpoint", trained_run / "best", "--bioimageio", out, "--size", 64, "--check_data", check_data]
    proc = run_offline("export_onnx.py", *args)
    assert "passed bioimageio.core's test_model" in proc.stdout
    assert os.listdir(out.parent) == ["tiny.zip"]  # no .onnx (no --out given) and no temporary
    return out


def assert_fails_after_converting(proc, *fragments):
    """assert_fails, once the converter's two progress lines (it prints them itself, on stderr) are set aside."""
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if "onverting model" not in line)
    assert_fails(proc, *fragments)


def rdf(package):
    with zipfile.ZipFile(package) as z:
        return YAML(typ="safe").load(z.read("rdf.yaml")), set(z.namelist())


def test_the_package_passes_bioimageio_cores_own_test_offline(package):
    code = "import sys; from bioimageio.core import test_model; print(test_model(sys.argv[1]).status)"
    assert run_offline("-c", code, package).stdout.strip().splitlines()[-1] == "passed"


def test_the_description_has_what_the_tools_read(package, check_data):
    descr, names = rdf(package)
    assert descr["format_version"].startswith("0.5") and descr["type"] == "model"
    assert list(descr["weights"]) == ["onnx"] and descr["weights"]["onnx"]["opset_version"] >= 11
    assert {"weights.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md", "rdf.yaml"} <= names
    (raw,), (prob,) = descr["inputs"], descr["outputs"]
    assert [a["type"] for a in raw["axes"]] == ["batch", "channel", "space", "space"]
    assert raw["axes"][2]["size"] == {"min": bio.MIN_SIZE, "step": 16} == raw["axes"][3]["size"]
    (norm,) = [p for p in raw["preprocessing"] if p["id"] != "ensure_dtype"]
    assert norm == {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}
    assert [a.get("halo") for a in prob["axes"]] == [None, None, bio.HALO, bio.HALO]
    assert {"segmentation", "2d", "electron-microscopy", "membrane"} <= set(descr["tags"])
    assert {c["doi"] for c in descr["cite"]} == {"10.1007/978-3-319-24574-4_28", "10.3389/fnana.2015.00142"}
    assert descr["license"] == "CC-BY-4.0" and descr["authors"][0]["name"]
    assert descr["config"]["deepimagej"]["allow_tiling"] is True
    with zipfile.ZipFile(package) as z:
        test_input = np.load(z.open("test_input.npy"))
        readme = z.read("README.md").decode()
    first = cv2.imread(os.path.join(check_data, "0.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(test_input[0, 0], first)  # the real first slice, at a declared size already
    assert "V_rand" in readme and "'width': 4" in readme  # the run's held-out scores (log.csv) and its model


def test_predict_runs_the_package_as_it_runs_the_checkpoint(package, trained_run, tmp_path):
    images = write_dataset(str(tmp_path / "data"), n_train=0, n_test=2, size=(72, 104), seed=1) + "/test"
    predict_script(trained_run / "best", images, tmp_path / "flow")
    assert "ONNX Runtime" in predict_script(package, images, tmp_path / "zip").stdout
    for name in sorted(os.listdir(tmp_path / "flow" / "prob")):
        a, b = (
            cv2.imread(str(tmp_path / r / "prob" / name), cv2.IMREAD_UNCHANGED).astype(int) for r in ("flow", "zip")
        )
        assert np.abs(a - b).max() <= 1, name


def test_a_package_whose_test_output_is_not_the_models_is_refused(trained_run, check_data, tmp_path):
    out = tmp_path / "changed.zip"
    argv = ["export_onnx.py", "--checkpoint", str(trained_run / "best"), "--bioimageio", str(out), "--size", "64"]
    code = (
        "import runpy, sys; import isbi_unet.bioimageio as b; own = b.test_output; "
        "b.test_output = lambda *a: own(*a) * 0.5; "  # the package then claims outputs its model does not give
        f"sys.argv = {argv + ['--check_data', check_data]!r}; runpy.run_path('export_onnx.py', run_name='__main__')"
    )
    proc = run_offline("-c", code, check=False)
    assert_fails_after_converting(proc, out, "bioimageio.core's test failed", "disagree with expected values")
    assert os.listdir(tmp_path) == []


def test_a_package_without_its_weights_is_one_line(package, tmp_path):
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if item.filename != "weights.onnx":
                dst.writestr(item, src.read(item.filename))
    images = write_dataset(str(tmp_path / "data"), n_train=0, n_test=1) + "/test"
    assert_fails(predict_script(broken, images, tmp_path / "res", check=False), broken)
    assert not (tmp_path / "res").exists()


def test_a_model_the_converter_cannot_take_writes_no_package(check_data, tmp_path):
    import oneflow as flow

    from isbi_unet.checkpoint import save_checkpoint
    from unet import UNet

    flow.manual_seed(0)
    save_checkpoint(tmp_path / "bilinear", UNet(1, 1, bilinear=True, width=4), epoch=0)
    out = tmp_path / "bilinear.zip"
    args = ["--checkpoint", tmp_path / "bilinear", "--bioimageio", out, "--size", 64, "--check_data", check_data]
    proc = run("export_onnx.py", *args, check=False)  # the converter's own log of its failure comes first
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: OneFlow's converter")
    assert os.listdir(tmp_path) == ["bilinear"]


@pytest.mark.parametrize("script", ["export_onnx.py", "predict_unet_test.py"])
def test_without_bioimageio_a_package_says_how_to_install(script, package, check_data, tmp_path):
    if script == "export_onnx.py":
        argv = [script, "--bioimageio", str(tmp_path / "pkg.zip"), "--check_data", check_data]
    else:
        argv = [script, "--checkpoint", str(package), "--Test_Data_path", check_data]
        argv += ["--save_res_path", str(tmp_path / "res")]
    code = (
        "import runpy, sys; sys.modules['bioimageio'] = None; "  # None makes `import bioimageio...` fail
        f"sys.argv = {argv!r}; runpy.run_path({argv[0]!r}, run_name='__main__')"
    )
    assert_fails(run("-c", code, check=False), "bioimageio.core", "requirements-bioimageio.txt")
    assert os.listdir(tmp_path) == []


def test_the_test_input_is_cut_or_mirrored_to_a_declared_size():
    image = np.arange(100 * 300, dtype=np.uint32).reshape(100, 300).astype(np.uint8)
    cut = bio.test_input(image)
    assert cut.shape == (bio.MIN_SIZE, 288)  # 100 mirrored up to 112; 300 cut down to 112 + 11 x 16
    assert np.array_equal(cut[:100, :288], image[:, :288])


def test_the_overlay_cover_is_two_to_one(tmp_path):
    image = np.full((128, 128), 200, np.uint8)
    prob = np.ones((128, 128), np.float32)
    prob[60:68] = 0  # a membrane
    bio.cover(image, prob, str(tmp_path / "cover.png"))
    cover = cv2.imread(str(tmp_path / "cover.png"))
    assert cover.shape[1] == 2 * cover.shape[0]
    right = cover[:, cover.shape[1] // 2 :]
    assert right[right.shape[0] // 2, 10, 0] != right[10, 10, 0]  # the membrane is tinted, the cell is not


def test_a_package_is_known_as_this_repos_and_a_users_zip_is_kept(package, trained_run, check_data, tmp_path):
    from isbi_unet.outputs import written_kind

    assert written_kind(str(package)) == "bioimage.io package"
    theirs = tmp_path / "theirs.zip"
    theirs.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip of someone else's
    args = ["--checkpoint", trained_run / "best", "--bioimageio", theirs, "--check_data", check_data]
    assert_fails(run("export_onnx.py", *args, check=False), theirs, "--bioimageio", "--overwrite")
    assert theirs.read_bytes() == b"PK\x05\x06" + bytes(18)
