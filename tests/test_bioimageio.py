"""bioimage.io packages: export_onnx.py --bioimageio, bioimageio.core's own test offline, and the .zip read back."""

import json
import os
import re
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


TORCH_PYTHON = os.path.join(REPO, ".venv-torch", "bin", "python")
PEOPLE = ["--author", "Ada Lovelace", "--author", "Alan Turing", "--github_user", "ada-l"]


def torch_python():
    """The side venv `bash setup.sh --torch` makes; CI makes it and sets ISBI_UNET_REQUIRE_TORCH, so that there
    a missing one fails instead of skipping the PyTorch formats."""
    if os.path.exists(TORCH_PYTHON):
        return TORCH_PYTHON
    if os.environ.get("ISBI_UNET_REQUIRE_TORCH"):
        pytest.fail(f"{TORCH_PYTHON} is missing: bash setup.sh --torch")
    pytest.skip("no .venv-torch (bash setup.sh --torch makes it): the PyTorch weights cannot be made or tested")


@pytest.fixture(scope="session")
def check_data(tmp_path_factory):
    """256x256 slices: room to measure halos up to 112 px (the slice must exceed 2 x halo + 32)."""
    return write_dataset(str(tmp_path_factory.mktemp("bio_data")), n_train=0, n_test=2, size=(256, 256)) + "/test"


def export_args(checkpoint, out, check_data, *flags):
    return ["--checkpoint", checkpoint, "--bioimageio", out, "--size", 64, "--check_data", check_data, *PEOPLE, *flags]


@pytest.fixture(scope="session")
def exported(trained_run, check_data, tmp_path_factory):
    """trained_run's best checkpoint as a package with all three weight formats, built by the real script with
    no network; (package, the script's stdout)."""
    python = torch_python()
    out = tmp_path_factory.mktemp("bio") / "tiny.zip"
    flags = ["--package_version", "1.2.0", "--git_repo", "https://github.com/example/isbi-unet"]
    proc = run_offline("export_onnx.py", *export_args(trained_run / "best", out, check_data, *flags))
    assert "weights onnx, pytorch_state_dict, torchscript" in proc.stdout
    assert f"{python}" not in proc.stderr
    assert os.listdir(out.parent) == ["tiny.zip"]  # no .onnx (no --out given) and no temporary
    return out, proc.stdout


@pytest.fixture(scope="session")
def package(exported):
    return exported[0]


def assert_fails_after_converting(proc, *fragments):
    """assert_fails, once the converter's two progress lines (it prints them itself, on stderr) are set aside."""
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True) if "onverting model" not in line)
    assert_fails(proc, *fragments)


def rdf(package):
    with zipfile.ZipFile(package) as z:
        return YAML(typ="safe").load(z.read("rdf.yaml")), set(z.namelist())


# test_model with a weight format; its io checks ask api.github.com about each github_user, which needs a
# network: the account the export was given is taken as it is (as the export's own test does).
TEST_MODEL = """
import sys
from bioimageio.spec._internal import constants
constants.KNOWN_GITHUB_USERS.add("ada-l")
from bioimageio.core import test_model
summary = test_model(sys.argv[1], weight_format=sys.argv[2], devices=["cpu"])
print(summary.status)
"""


def test_the_package_passes_bioimageio_cores_own_test_offline(package):
    """This venv has no torch: its bioimageio.core tests the ONNX weights."""
    assert run_offline("-c", TEST_MODEL, package, "onnx").stdout.strip().splitlines()[-1] == "passed"


def test_a_separate_python_with_torch_tests_all_three_formats_offline(package):
    """What a consumer runs: bioimageio.core in another Python (3.11, torch, onnxruntime), every weight format."""
    env = {**os.environ, "BIOIMAGEIO_PERFORM_IO_CHECKS": "false"}
    prefix = offline_prefix()
    if prefix is None:
        pytest.skip("unshare -n is not permitted here, so 'no network' cannot be enforced")
    for weight_format in ("onnx", "pytorch_state_dict", "torchscript"):
        # the GitHub account check of test_model needs a network; the test of the model itself does not
        proc = subprocess.run(
            [*prefix, torch_python(), "-c", TEST_MODEL, str(package), weight_format],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0 and proc.stdout.split()[-1] == "passed", (weight_format, proc.stderr[-2000:])


def halo_of(stdout):
    return int(re.search(r"halo (\d+) px", stdout).group(1))


def test_the_description_has_what_the_tools_and_curators_read(exported, check_data):
    package, stdout = exported
    descr, names = rdf(package)
    assert descr["format_version"].startswith("0.5") and descr["type"] == "model"
    weights = descr["weights"]
    assert set(weights) == {"onnx", "pytorch_state_dict", "torchscript"}
    assert 11 <= weights["onnx"]["opset_version"] <= 17
    arch = weights["pytorch_state_dict"]["architecture"]
    assert arch["source"] == "unet_torch.py" and arch["callable"] == "UNet"
    assert arch["kwargs"] == {"n_channels": 1, "n_classes": 1, "width": 4}
    assert "parent" not in weights["pytorch_state_dict"] and weights["torchscript"]["parent"] == "pytorch_state_dict"
    expected = {"weights.onnx", "weights.pt", "weights_torchscript.pt", "unet_torch.py", "test_input.npy"}
    expected |= {"test_output.npy", "sample_input.png", "sample_output.png", "cover.png", "README.md", "rdf.yaml"}
    assert names == expected  # nothing of the export's own (weights.npz, kwargs.json) left in
    (raw,), (prob,) = descr["inputs"], descr["outputs"]
    halo = halo_of(stdout)
    assert halo % 16 == 0 and f"halo {halo} px" in stdout
    assert [a["type"] for a in raw["axes"]] == ["batch", "channel", "space", "space"]
    assert raw["axes"][2]["size"] == {"min": 2 * halo + 16, "step": 16} == raw["axes"][3]["size"]
    (norm,) = [p for p in raw["preprocessing"] if p["id"] != "ensure_dtype"]
    assert norm == {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}
    assert [a.get("halo") for a in prob["axes"]] == [None, None, halo, halo]
    assert raw["sample_tensor"]["source"] == "sample_input.png" and prob["sample_tensor"]["source"].endswith(".png")
    assert all(len(f["sha256"]) == 64 for f in (raw["test_tensor"], prob["test_tensor"], descr["documentation"]))
    assert {"segmentation", "2d", "electron-microscopy", "membrane"} <= set(descr["tags"])
    assert {c["doi"] for c in descr["cite"]} == {"10.1007/978-3-319-24574-4_28", "10.3389/fnana.2015.00142"}
    assert descr["license"] == "MIT" and "MIT License" in open(os.path.join(REPO, "LICENSE")).read()
    assert [a["name"] for a in descr["authors"]] == ["Ada Lovelace", "Alan Turing"]
    assert descr["maintainers"] == [{"name": "Ada Lovelace", "github_user": "ada-l"}]
    assert descr["version"] == "1.2.0" and descr["git_repo"] == "https://github.com/example/isbi-unet"
    assert descr["training_data"]["name"].startswith("ISBI 2012")
    assert "10.3389/fnana.2015.00142" in {c["doi"] for c in descr["training_data"]["cite"]}
    assert descr["config"]["deepimagej"]["allow_tiling"] is True
    with zipfile.ZipFile(package) as z:
        test_input = np.load(z.open("test_input.npy"))
        readme = z.read("README.md").decode()
    first = cv2.imread(os.path.join(check_data, "0.png"), cv2.IMREAD_GRAYSCALE)
    size = 2 * halo + 16 + (256 - 2 * halo - 16) // 16 * 16
    assert test_input.shape == (1, 1, size, size) and np.array_equal(test_input[0, 0], first[:size, :size])
    assert "V_rand" in readme and "'width': 4" in readme  # the run's held-out scores (log.csv) and its model
    assert "pydantic<2.14" in readme and "blocksize_parameter" in readme and f"{2 * halo + 16} + k x 16" in readme


def test_every_format_agrees_with_oneflow_and_tiles_with_the_whole(exported):
    """The export's own report: each weight format within 1/255 of the OneFlow checkpoint, and the halo it
    measured leaves tiles within 1/255 of the whole slice."""
    stdout = exported[1]

    def per_format(after):
        part = stdout.split(after)[1].split(";")[0].splitlines()[0]
        return {f: float(d) for f, d in re.findall(r"(onnx|pytorch_state_dict|torchscript) ([0-9.e+-]+)", part)}

    for numbers in (per_format("from OneFlow:"), per_format("differs from the whole slice by")):
        assert set(numbers) == {"onnx", "pytorch_state_dict", "torchscript"}
        assert all(d <= 1 / 255 for d in numbers.values()), numbers
    seams = dict(re.findall(r"(\d+) px ([0-9.]+)", stdout.split("tiles vs whole slice:")[1].split(")")[0]))
    assert float(seams[str(halo_of(stdout))]) <= 1 / 255


def test_a_tiled_prediction_of_the_package_equals_the_whole_slice(package):
    """In the separate Python, with the torchscript weights: bioimageio.core's blockwise prediction (several
    blocks) against the package's own whole-slice output, away from the border the tools pad themselves."""
    code = (
        "import sys, json, importlib.util as u; s = u.spec_from_file_location('w', sys.argv[2]); "
        "w = u.module_from_spec(s); s.loader.exec_module(w); "  # by path: isbi_unet/ would shadow bioimageio
        "from bioimageio.spec import load_model_description as load; "
        "d = load(sys.argv[1], perform_io_checks=False); halo = d.outputs[0].axes[2].halo; "
        "print(json.dumps([halo, *w.tiled_difference(d, 'torchscript', halo, d.inputs[0].axes[2].size.min + 16)]))"
    )
    proc = subprocess.run(
        [torch_python(), "-c", code, str(package), os.path.join(REPO, "isbi_unet", "package_worker.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    halo, diff, blocks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert blocks >= 4 and diff <= 1 / 255


def test_the_twin_has_the_oneflow_models_names_and_shapes():
    """Every parameter and buffer of unet_torch.UNet is the OneFlow UNet's, by name and shape (strict loading)."""
    from isbi_unet.model import UNet

    ours = {k: list(v.shape) for k, v in UNet(1, 1, False, 4).state_dict().items()}
    code = (
        "import sys, json; sys.path.append(sys.argv[1]); import unet_torch; "
        "print(json.dumps({k: list(v.shape) for k, v in unet_torch.UNet(1, 1, 4).state_dict().items()}))"
    )
    proc = subprocess.run(
        [torch_python(), "-c", code, os.path.join(REPO, "isbi_unet")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == ours


def test_predict_runs_the_package_as_it_runs_the_checkpoint(package, trained_run, tmp_path):
    images = write_dataset(str(tmp_path / "data"), n_train=0, n_test=2, size=(72, 104), seed=1) + "/test"
    predict_script(trained_run / "best", images, tmp_path / "flow")
    assert "ONNX Runtime" in predict_script(package, images, tmp_path / "zip").stdout
    for name in sorted(os.listdir(tmp_path / "flow" / "prob")):
        a, b = (
            cv2.imread(str(tmp_path / r / "prob" / name), cv2.IMREAD_UNCHANGED).astype(int) for r in ("flow", "zip")
        )
        assert np.abs(a - b).max() <= 1, name


def run_export_patched(patch, argv):
    """export_onnx.py with ARGV, after the Python statement PATCH (on `b`, isbi_unet.bioimageio), offline."""
    code = (
        f"import runpy, sys; import isbi_unet.bioimageio as b; {patch}; "
        f"sys.argv = {['export_onnx.py', *map(str, argv)]!r}; runpy.run_path('export_onnx.py', run_name='__main__')"
    )
    return run_offline("-c", code, check=False)


def test_a_package_whose_test_output_is_not_the_models_is_refused(trained_run, check_data, tmp_path):
    out = tmp_path / "changed.zip"
    # the package then claims outputs its model does not give
    patch = "own = b.write_files; b.write_files = lambda f, i, e, r: own(f, i, e * 0.5, r)"
    proc = run_export_patched(patch, export_args(trained_run / "best", out, check_data, "--torch_python", "none"))
    assert_fails_after_converting(proc, out, "bioimageio.core's test failed (onnx)", "disagree with expected values")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_failing_torch_format_writes_no_package(trained_run, check_data, tmp_path):
    """torchscript weights that are not TorchScript (the state dict's bytes): its test_model fails, the others pass."""
    torch_python()
    out = tmp_path / "bad.zip"
    patch = (
        "import shutil, os; own = b.add_torch_weights\n"
        "def add(folder, *a):\n"
        "    info = own(folder, *a)\n"
        "    shutil.copyfile(os.path.join(folder, 'weights.pt'), os.path.join(folder, 'weights_torchscript.pt'))\n"
        "    return info\n"
        "b.add_torch_weights = add"
    )
    proc = run_export_patched(patch, export_args(trained_run / "best", out, check_data))
    assert_fails_after_converting(proc, out, "not written", "test failed (torchscript)")
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


def test_a_model_the_converter_cannot_take_writes_no_package(bilinear, check_data, tmp_path):
    out = tmp_path / "bilinear.zip"
    proc = run("export_onnx.py", *export_args(bilinear, out, check_data, "--torch_python", "none"), check=False)
    # the converter's own log of its failure comes first
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: OneFlow's converter")
    assert os.listdir(tmp_path) == []


def test_a_model_the_pytorch_twin_cannot_hold_writes_no_package(bilinear, check_data, tmp_path):
    torch_python()
    out = tmp_path / "bilinear.zip"
    proc = run("export_onnx.py", *export_args(bilinear, out, check_data), check=False)
    assert_fails(proc, "bilinear upsampling has no PyTorch twin", "--torch_python none")
    assert os.listdir(tmp_path) == []


def test_a_python_without_torch_is_one_line_before_anything_runs(trained_run, check_data, tmp_path):
    out = tmp_path / "pkg.zip"
    # this venv's own Python: it has bioimageio.core, but no torch
    proc = run(
        "export_onnx.py",
        *export_args(trained_run / "best", out, check_data, "--torch_python", sys.executable),
        check=False,
    )
    assert_fails(proc, sys.executable, "not a Python with torch", "No module named 'torch'", "setup.sh --torch")
    proc = run(
        "export_onnx.py",
        *export_args(trained_run / "best", out, check_data, "--torch_python", tmp_path / "no"),
        check=False,
    )
    assert_fails(proc, "--torch_python cannot run", "setup.sh --torch")
    assert os.listdir(tmp_path) == []


def test_without_torch_the_package_has_onnx_weights_and_says_how_to_add_them(trained_run, check_data, tmp_path):
    out = tmp_path / "onnx.zip"
    proc = run_offline("export_onnx.py", *export_args(trained_run / "best", out, check_data, "--torch_python", "none"))
    assert "weights onnx;" in proc.stdout
    (note,) = [line for line in proc.stdout.splitlines() if "ONNX weights only" in line]
    assert "bash setup.sh --torch" in note and "--torch_python" in note
    assert list(rdf(out)[0]["weights"]) == ["onnx"]


def test_a_package_names_its_authors(trained_run, check_data, tmp_path):
    args = ["--checkpoint", trained_run / "best", "--bioimageio", tmp_path / "p.zip", "--check_data", check_data]
    assert_fails(run("export_onnx.py", *args, check=False), "--bioimageio needs --author")
    too_many = ["--author", "A", "--github_user", "a", "--github_user", "b"]
    assert_fails(run("export_onnx.py", *args, *too_many, check=False), "--github_user: 2 given for 1 --author")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--opset", 18], "--opset 18: deepImageJ reads opset 17 at most"),
        (["--git_repo", "github.com/x/y"], "--git_repo github.com/x/y: give the repository's https:// URL"),
    ],
)
def test_package_flags_deepimagej_or_curators_cannot_use_are_refused(flags, message, trained_run, check_data, tmp_path):
    args = export_args(trained_run / "best", tmp_path / "p.zip", check_data, *flags)
    assert_fails(run("export_onnx.py", *args, check=False), message)
    assert os.listdir(tmp_path) == []


def test_the_halo_is_the_smallest_whose_tiles_equal_the_whole():
    """A stand-in network that sees 20 px around each pixel (a box filter): 16 px of halo leave seams, 32 none."""

    def forward(batch):
        x = batch[0, 0].astype(np.float64)
        r = 20
        padded = np.pad(x, r)  # zero padding, like a network's 'same' convolutions
        summed = np.cumsum(np.cumsum(np.pad(padded, ((1, 0), (1, 0))), 0), 1)
        n = 2 * r + 1
        box = summed[n:, n:] - summed[:-n, n:] - summed[n:, :-n] + summed[:-n, :-n]
        return (box / n**2)[None, None].astype(np.float32)

    image = np.random.default_rng(0).integers(0, 255, (192, 192)).astype(np.uint8)
    halo, measured = bio.measure_halo(forward, image)
    assert halo == 32 and list(measured) == [16, 32]
    assert measured[16] > 1 / 255 and measured[32] < 1e-5
    with pytest.raises(bio.DataError, match="cannot show a halo"):
        bio.measure_halo(forward, image[:64, :64])  # too small to hold a 32 px halo and something to compare


@pytest.mark.parametrize("script", ["export_onnx.py", "predict_unet_test.py"])
def test_without_bioimageio_a_package_says_how_to_install(script, package, check_data, tmp_path):
    if script == "export_onnx.py":
        argv = [script, "--bioimageio", str(tmp_path / "pkg.zip"), "--check_data", check_data, "--author", "A"]
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
    cut = bio.test_input(image, 112)
    assert cut.shape == (112, 288)  # 100 mirrored up to 112; 300 cut down to 112 + 11 x 16
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
    args = export_args(trained_run / "best", theirs, check_data)
    assert_fails(run("export_onnx.py", *args, check=False), theirs, "--bioimageio", "--overwrite")
    assert theirs.read_bytes() == b"PK\x05\x06" + bytes(18)
