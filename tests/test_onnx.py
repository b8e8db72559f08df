"""ONNX: export_onnx.py (OneFlow's converter) and predict_unet_test.py through ONNX Runtime, on the real scripts."""

import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from conftest import assert_fails, predict_script, run, user_checkout, write_dataset

onnx = pytest.importorskip("onnx")  # requirements-onnx.txt installs only on CPython 3.10+
pytest.importorskip("onnxruntime")

SIZE = 48  # the size export_onnx.py traces and checks at; the file then takes any multiple of 16


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """trained_run's best checkpoint exported at SIZE by the real script (checked there against OneFlow)."""
    out = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    check = trained_run.parent / "data" / "test"
    proc = run(
        "export_onnx.py", "--checkpoint", trained_run / "best", "--out", out, "--size", SIZE, "--check_data", check
    )
    assert "max difference of probabilities" in proc.stdout
    assert os.listdir(out.parent) == ["unet.onnx"]  # no temporary left beside it
    return out


def predict(checkpoints, images, res, *flags, check=True):
    args = ["--checkpoint", *checkpoints, "--Test_Data_path", images, "--save_res_path", res, *flags]
    return run("predict_unet_test.py", *args, check=check)


def assert_same_probabilities(a, b):
    """The same prob/ PNGs, each pixel within 1/255."""
    names = sorted(os.listdir(a / "prob"))
    assert names and names == sorted(os.listdir(b / "prob"))
    for name in names:
        pa, pb = (cv2.imread(str(r / "prob" / name), cv2.IMREAD_UNCHANGED).astype(int) for r in (a, b))
        assert np.abs(pa - pb).max() <= 1, name


def test_the_file_carries_config_size_and_preprocessing(exported):
    model = onnx.load(str(exported))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["isbi_unet.format"] == "isbi-unet-onnx/1" and meta["isbi_unet.input_size"] == str(SIZE)
    assert json.loads(meta["isbi_unet.model_config"]) == {
        "n_channels": 1,
        "n_classes": 1,
        "bilinear": False,
        "width": 4,
    }
    assert "mean" in meta["isbi_unet.preprocess"] and "sigmoid" in meta["isbi_unet.output"]


def test_the_file_takes_any_size_at_the_lowest_ir_version(exported):
    model = onnx.load(str(exported))
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", 1, "height", "width"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DepthToSpace") == 4 and "Reshape" not in ops  # the 4 up-convolutions' pixel shuffles
    (opset,) = [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")]
    assert opset == 11 and model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import)) == 6


def test_onnx_runtime_agrees_with_oneflow_at_a_size_other_than_the_exports(exported, trained):
    import oneflow as flow

    from conftest import make_slice
    from isbi_unet.checkpoint import load_model
    from isbi_unet.images import preprocess
    from isbi_unet.onnx_backend import load_onnx, onnx_forward

    rng = np.random.default_rng(3)
    x = np.stack([preprocess(make_slice(rng, (128, 192))[0]) for _ in range(2)])  # a batch of 2, 128x192
    model, _ = load_model(trained / "best")
    with flow.no_grad():
        expected = flow.sigmoid(model(flow.tensor(x))).numpy()
    got = onnx_forward(load_onnx(str(exported))[0])(x)
    assert got.shape == (2, 1, 128, 192) and np.abs(got - expected).max() <= 1 / 255


def test_onnx_runtime_writes_what_oneflow_writes(exported, trained, data, tmp_path):
    flow_res, onnx_res = tmp_path / "flow", tmp_path / "onnx"
    predict_script(trained / "best", f"{data}/test", flow_res)
    assert "ONNX Runtime" in predict_script(exported, f"{data}/test", onnx_res).stdout
    assert sorted(os.listdir(onnx_res)) == sorted(os.listdir(flow_res))  # masks, prob/, submission.tif, run.json
    assert_same_probabilities(flow_res, onnx_res)
    record = json.loads((onnx_res / "run.json").read_text())
    assert record["args"]["checkpoint"] == str(exported) and record["model_config"]["width"] == 4


def test_tta_with_onnx_and_oneflow_in_one_ensemble(exported, trained, data, tmp_path):
    predict([trained / "best"], f"{data}/test", tmp_path / "flow", "--tta")
    predict([exported, trained / "best"], f"{data}/test", tmp_path / "mixed", "--tta")  # the same weights twice
    assert_same_probabilities(tmp_path / "flow", tmp_path / "mixed")


def test_other_sizes_run_whole_as_in_oneflow(exported, trained, tmp_path):
    images = write_dataset(str(tmp_path / "data"), n_train=0, n_test=2, size=(40, 72)) + "/test"
    out = predict([exported], images, tmp_path / "onnx").stdout
    assert "ONNX Runtime" in out and "overlap-tile" not in out
    predict([trained / "best"], images, tmp_path / "flow")
    assert_same_probabilities(tmp_path / "flow", tmp_path / "onnx")


@pytest.fixture
def fixed_export(trained, tmp_path):
    """A file as export_onnx.py wrote it before its sizes were freed: the converter's 1x1xSIZExSIZE graph."""
    from isbi_unet.checkpoint import load_model
    from isbi_unet.onnx_export import add_metadata, convert

    model, state = load_model(trained / "best")
    path = tmp_path / "fixed.onnx"
    convert(model, SIZE, str(path))
    add_metadata(str(path), state, SIZE, trained / "best")
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, SIZE, SIZE]
    return path


def test_a_fixed_size_file_tiles_other_sizes_at_its_size(fixed_export, trained, tmp_path):
    images = write_dataset(str(tmp_path / "data"), n_train=0, n_test=2, size=(40, 72)) + "/test"
    out = predict([fixed_export], images, tmp_path / "onnx").stdout
    assert "2 of 2 images (e.g. 72x40) differ from the ONNX export's 48x48: overlap-tile inference at 48" in out
    # OneFlow's overlap-tile inference at the same size and overlap (the script's --tile now means blocks, which
    # give the whole-image pass), in this process
    from isbi_unet.images import read_gray
    from isbi_unet.predictor import Predictor, Spec

    flow = Predictor.open(Spec((str(trained / "best"),), tile=SIZE, overlap=SIZE - 16))
    for name in sorted(os.listdir(images)):
        onnx_prob = cv2.imread(str(tmp_path / "onnx" / "prob" / name), cv2.IMREAD_UNCHANGED).astype(int)
        flow_prob = np.round(flow(read_gray(os.path.join(images, name))) * 255).astype(int)
        assert np.abs(onnx_prob - flow_prob).max() <= 1, name


def foreign_model(path, channels, metadata=None):
    """A one-node ONNX model (Identity) with a 1 x channels x SIZE x SIZE input, and optional metadata."""
    from onnx import TensorProto, helper

    shape = [1, channels, SIZE, SIZE]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime 1.19 reads
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def bad_model(kind, exported, path):
    good = exported.read_bytes()
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
        foreign_model(path, 3 if kind == "three_channels" else 1, meta if kind == "three_channels" else None)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt", "unreadable ONNX model, truncated or corrupt"),
        ("truncated", "unreadable ONNX model, truncated or corrupt"),
        ("no_metadata", "not an export of this repo (no 'isbi-unet-onnx/1' metadata)"),
        ("three_channels", "the model takes 3 input channels; EM slices have 1"),
    ],
)
def test_bad_onnx_files_are_one_line_and_write_nothing(kind, message, exported, data, tmp_path):
    model = bad_model(kind, exported, tmp_path / f"{kind}.onnx")
    res = tmp_path / "res"
    assert_fails(predict_script(model, f"{data}/test", res, check=False), model, message)
    assert not res.exists()


def test_a_tile_other_than_a_fixed_size_files_is_refused(fixed_export, data, tmp_path):
    args = ["--tile", 32, "--overlap", 16]
    proc = predict_script(fixed_export, f"{data}/test", tmp_path / "res", *args, check=False)
    assert_fails(proc, "--tile 32: the ONNX model takes 48x48 inputs only")
    assert not (tmp_path / "res").exists()


def test_without_onnxruntime_onnx_input_says_how_to_install(exported, data, tmp_path):
    argv = ["predict_unet_test.py", "--checkpoint", str(exported), "--Test_Data_path", f"{data}/test"]
    code = (
        "import runpy, sys; sys.modules['onnxruntime'] = None; "  # None makes `import onnxruntime` fail
        f"sys.argv = {argv + ['--save_res_path', str(tmp_path / 'res')]!r}; "
        "runpy.run_path('predict_unet_test.py', run_name='__main__')"
    )
    assert_fails(run("-c", code, check=False), "need onnxruntime", "requirements-onnx.txt")
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", 50], "--size must be a multiple of 16"),
        (["--out", "unet.pt"], "name the ONNX file .onnx"),
        (["--opset", 10], "--opset: must be an integer in 11..21"),
        (["--opset", 22], "--opset: must be an integer in 11..21"),  # a traceback after the conversion, once
        (["--tolerance", "inf"], "--tolerance: must be a finite number in (0, 1]"),
        (["--size", 160000], "--size: must be an integer in 16..4096"),
        (["--bioimageio", "unet.tar"], "name the bioimage.io package .zip"),
    ],
)
def test_export_refuses_bad_flags(flags, message, trained):
    assert_fails(run("export_onnx.py", "--checkpoint", trained / "best", *flags, check=False), message)


def test_onnx_runtime_inference_needs_no_oneflow(exported):
    code = (
        "import sys; sys.modules['oneflow'] = None; import numpy as np; "  # any `import oneflow` now fails
        "from isbi_unet.onnx_backend import load_onnx, onnx_forward; from isbi_unet.tiling import predict_tiled; "
        "forward = onnx_forward(load_onnx(sys.argv[1])[0]); "
        "print(predict_tiled(forward, np.zeros((1, 40, 72), np.float32), tile=48, overlap=32).shape)"
    )
    assert run("-c", code, exported).stdout.strip() == "(1, 40, 72)"


def test_a_model_the_converter_cannot_take_is_one_line_and_no_file(data, tmp_path):
    import oneflow as flow

    from isbi_unet.checkpoint import save_checkpoint
    from unet import UNet

    flow.manual_seed(0)
    save_checkpoint(tmp_path / "bilinear", UNet(1, 1, bilinear=True, width=4), epoch=0)
    out = tmp_path / "bilinear.onnx"
    args = ["--checkpoint", tmp_path / "bilinear", "--out", out, "--size", SIZE, "--check_data", f"{data}/test"]
    proc = run("export_onnx.py", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: OneFlow's converter")
    assert sorted(os.listdir(tmp_path)) == ["bilinear", "data"]  # neither the .onnx nor its .tmp


def test_test_sh_takes_an_onnx_file(exported, tmp_path):
    # `bash test.sh --checkpoint unet.onnx`, as the README says, in a copy of the code with tiny data in data/
    root = user_checkout(tmp_path / "repo", n_train=2, n_test=2)
    proc = subprocess.run(
        ["bash", "test.sh", "--checkpoint", exported], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    res = root / "results"
    names = sorted(os.listdir(root / "data" / "test"))
    assert sorted(os.listdir(res / "prob")) == names and sorted(os.listdir(res / "overlay")) == [*names, "overlay.json"]
    assert cv2.imread(str(res / "figure.png")) is not None
    assert json.loads((res / "run.json").read_text())["args"]["checkpoint"] == str(exported)


def test_an_export_replaces_only_its_own_kind_of_file(exported, trained_run, data, tmp_path):
    from isbi_unet.outputs import written_kind

    assert written_kind(str(exported)) == "ONNX export"
    theirs = tmp_path / "theirs.onnx"
    shutil.copy(exported, theirs)
    with open(theirs, "r+b") as f:  # the same bytes but for the mark: an ONNX file of someone else's
        blob = f.read().replace(b"isbi-unet-onnx/", b"someone-else/1")
        f.seek(0)
        f.write(blob)
    before = theirs.read_bytes()
    args = ["--checkpoint", trained_run / "best", "--size", SIZE, "--check_data", f"{data}/test"]
    assert_fails(run("export_onnx.py", *args, "--out", theirs, check=False), theirs, "--out", "--overwrite")
    assert theirs.read_bytes() == before
