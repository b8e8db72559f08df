"""isbi_unet.predictor in this process: backends, ensembles, fixed-size tiling and the pool workers' loading."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, make_slice, write_dataset
from isbi_unet import checkpoint, predictor
from isbi_unet.errors import DataError
from isbi_unet.predictor import OneFlowBackend, OnnxBackend, Predictor, Spec


@pytest.fixture
def checkpoints(tmp_path):
    """Two untrained width-4 UNets with different weights, saved as checkpoints."""
    import oneflow as flow

    from unet import UNet

    paths = []
    for seed in (0, 1):
        flow.manual_seed(seed)
        paths.append(str(tmp_path / f"seed{seed}"))
        checkpoint.save_checkpoint(paths[-1], UNet(1, 1, width=4), epoch=seed)
    return paths


@pytest.fixture
def image():
    return make_slice(np.random.default_rng(0), (40, 56))[0]


class Fixed:
    """A stand-in backend with a fixed input size: probability = 0.25 everywhere, batches recorded."""

    runtime, state = "fixed", {"model_config": {}, "epoch": 0}

    def __init__(self, size):
        self.input_size, self.shapes = size, []

    def probabilities(self, batch):
        self.shapes.append(batch.shape)
        return np.full(batch.shape, 0.25, np.float32)


def test_an_ensemble_of_one_model_twice_gives_that_models_map_exactly(checkpoints, image):
    one = Predictor.open(Spec(checkpoints[:1]))(image)
    assert one.shape == image.shape and one.dtype == np.float32 and 0 < one.min() <= one.max() < 1
    np.testing.assert_array_equal(Predictor.open(Spec((checkpoints[0],) * 2))(image), one)


def test_an_ensemble_averages_its_members(checkpoints, image):
    a, b = (Predictor.open(Spec((c,), tta=True))(image) for c in checkpoints)
    assert np.abs(a - b).mean() > 1e-4  # two different models
    np.testing.assert_allclose(Predictor.open(Spec(tuple(checkpoints), tta=True))(image), (a + b) / 2, atol=1e-6)


def test_a_process_loads_each_checkpoint_once_however_many_slices(checkpoints, image, monkeypatch):
    loads = []
    load_model = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device: loads.append(path) or load_model(path, device))
    spec = Spec(tuple(checkpoints))
    predictor.worker_predictor.cache_clear()  # a fresh worker process
    maps = [predictor.predict_in_worker(spec, image) for _ in range(3)]
    predictor.worker_predictor.cache_clear()  # its models, let go
    assert loads == checkpoints
    np.testing.assert_array_equal(maps[2], Predictor.open(spec)(image))


def test_the_kind_of_model_is_told_by_its_path():
    assert predictor.backend_class("runs/a/unet.ONNX") is OnnxBackend
    assert predictor.backend_class("runs/a/last") is OneFlowBackend
    assert predictor.backend_class("runs/a/last", "onnxruntime") is OnnxBackend  # on its conversion
    assert predictor.uses_every_core(["a.onnx", "b.onnx"]) and not predictor.uses_every_core(["a.onnx", "last"])


def test_a_fixed_input_size_tiles_only_the_images_that_need_it():
    fixed = Fixed(48)
    p = Predictor([fixed], 0, 64, False)
    assert p.plan((48, 48)) == (0, 64) and p.plan((45, 33)) == (0, 64)  # padded to 48x48: one pass
    assert p.plan((40, 72)) == (48, 32)  # tiles of 48, the overlap cut to what a 48 tile allows
    assert p.tiling_note([(48, 48), (40, 72)]).startswith("1 of 2 images (e.g. 72x40) differ from the ONNX")
    np.testing.assert_allclose(p(np.zeros((40, 72), np.uint8)), 0.25)
    assert {s[1:] for s in fixed.shapes} == {(1, 48, 48)}  # batches of 48x48 tiles only
    assert Predictor([fixed], 48, 32, False).tiling_note([(40, 72)]) is None  # tiles asked for: nothing to say


@pytest.mark.parametrize(
    "sizes, tile, message",
    [((48, 64), 0, "take different input sizes [48, 64]"), ((48,), 32, "--tile 32: the ONNX model takes 48x48")],
)
def test_fixed_sizes_that_cannot_work_are_refused(sizes, tile, message):
    with pytest.raises(DataError, match=re.escape(message)):
        Predictor([Fixed(s) for s in sizes], tile, 16, False)


def test_run_json_fields_are_scalars_for_one_model_and_lists_for_an_ensemble(checkpoints):
    one, both = Predictor.open(Spec(checkpoints[:1])), Predictor.open(Spec(tuple(checkpoints), tile=32, tta=True))
    config = one.states[0]["model_config"]
    assert one.record() == {"checkpoint_epoch": 0, "model_config": config, "runtime": "OneFlow"}
    assert both.record()["checkpoint_epoch"] == [0, 1] and len(both.record()["model_config"]) == 2
    assert one.describe().endswith(", epoch 0") and one.describe_settings() == ""
    assert both.describe() == "mean of 2 checkpoints, epochs 0, 1" and both.describe_settings() == ", tiles 32, TTA"


def test_the_predictor_imports_without_oneflow():
    code = "import sys; sys.modules['oneflow'] = None; import isbi_unet.predictor"  # `import oneflow` now fails
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_ends_the_workers_even_when_the_parent_was_started_ignoring_sigterm(trained_run, tmp_path):
    """As under `nohup` or a shell's background job: the pool ends its workers with SIGTERM, which they must not
    inherit as ignored (a worker blocked on a full result pipe then kept the stopped run waiting forever)."""
    data = write_dataset(str(tmp_path / "data"), n_train=0, n_test=60, size=(96, 96))
    res = tmp_path / "res"
    cmd = [sys.executable, "predict_unet_test.py", "--checkpoint", str(trained_run / "best")]
    cmd += ["--Test_Data_path", f"{data}/test", "--save_res_path", str(res), "--tta", "--workers", "2"]

    def like_a_background_job():
        os.setsid()  # a group of its own, for a terminal's Ctrl-C to the parent and its workers
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=like_a_background_job
    )
    try:
        deadline = time.monotonic() + 120
        while not (os.path.isdir(res / "prob") and len(os.listdir(res / "prob")) >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, "no two slices done"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
