"""Cell probability maps from trained models: OneFlow checkpoints, ONNX exports, or an ensemble of them.

    spec = Spec(("checkpoints/best",), device="cpu", tile=0, overlap=64, tta=False)
    predictor = Predictor.open(spec)           # every model loaded and checked now
    prob = predictor(image)                    # uint8 HxW slice -> float32 HxW cell probability in [0, 1]
    prob = predictor.window(x)                 # the same from a standardised window (isbi_unet/volume.py's blocks)

A backend runs one model: `backend.probabilities(batch)` maps float32 Nx1xhxw to cell probabilities of the same
shape. `backend_class` alone tells model kinds apart, by path and engine. A Predictor averages its backends (an
ensemble) and owns the overlap-tile and TTA settings. OneFlow is imported only by a OneFlow backend, so ONNX models
run without it.

Engines (predict_unet_test.py --engine): a OneFlow checkpoint runs in OneFlow (`oneflow`), or is converted to ONNX
as it loads (OneFlow's own converter, in a child process, as export_onnx.py converts) and runs in ONNX Runtime or
OpenVINO. `auto`, the command's default, is ONNX Runtime on a CPU and OneFlow on a GPU or with --graph: on a CPU
ONNX Runtime gives the same probabilities (within 1e-6) several times faster and with a quarter of the memory
(docs/volumes.md#engines); OneFlow's eager CPU convolutions unfold their input.
"""

import functools
import os
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional

from isbi_unet.errors import DataError
from isbi_unet.formats import POOL
from isbi_unet.images import preprocess
from isbi_unet.onnx_backend import fixed_tile, is_onnx, load_onnx, onnx_forward
from isbi_unet.openvino_backend import ENGINES, ONNX_RUNTIME, OpenVinoBackend
from isbi_unet.tiling import predict_tiled


class OneFlowBackend:
    """A checkpoint directory written by TrainUnetDataSet.py, run by OneFlow, eagerly or through nn.Graph."""

    runtime = "OneFlow"
    uses_every_core = False  # eager CPU kernels keep about one core busy: more cores want more processes
    input_size = None  # any size that four poolings divide
    fallback = None  # why --engine auto could not convert it for ONNX Runtime, when that is why it runs here

    def __init__(self, path, device, graph, threads):
        from isbi_unet.checkpoint import load_model
        from isbi_unet.engine import InferenceGraphs

        self.model, self.state = load_model(path, device)
        self.device = device
        self.run = InferenceGraphs(self.model) if graph else self.model

    def probabilities(self, batch):
        import oneflow as flow

        with flow.no_grad():
            return flow.sigmoid(self.run(flow.tensor(batch, device=self.device))).numpy()


class OnnxBackend:
    """An export_onnx.py file or bioimage.io package, run by ONNX Runtime on the CPU (at any size, or at the
    fixed input size of an older export)."""

    runtime = "ONNX Runtime"
    uses_every_core = True  # ONNX Runtime's own threads
    converted = False  # True for a OneFlow checkpoint converted as it loaded

    def __init__(self, path, device, graph, threads):
        session, self.state = load_onnx(path, threads)
        self.input_size = self.state.get("input_size")
        self.probabilities = onnx_forward(session)


AUTO, ONEFLOW = "auto", "oneflow"  # --engine besides openvino_backend.ENGINES
CHOICES = (AUTO, ONEFLOW, *ENGINES)


def runs_in(path, engine, device="cpu", graph=False):
    """The engine that runs the model at `path` under --engine `engine`: `auto` is ONNX Runtime on a CPU and
    OneFlow on a GPU or with --graph (nn.Graph is OneFlow's); an .onnx file never runs in OneFlow."""
    if engine == AUTO:
        engine = ONEFLOW if graph or str(device).startswith("cuda") else ONNX_RUNTIME
    return ONNX_RUNTIME if engine == ONEFLOW and is_onnx(path) else engine


def backend_class(path, engine=ONEFLOW):
    """The backend class that runs the model at `path` in the (resolved) `engine`: the one place where model kinds
    are told apart (by name). A checkpoint in ONNX Runtime or OpenVINO is that backend on its conversion."""
    engine = runs_in(path, engine)
    if engine == ONEFLOW:
        return OneFlowBackend
    return OnnxBackend if engine == ONNX_RUNTIME else OpenVinoBackend


def open_model(path, device="cpu", graph=False, threads=None, engine=ONEFLOW):
    """The model at `path`, loaded and checked (a bad file is one DataError), behind the backend of its engine."""
    resolved = runs_in(path, engine, device, graph)
    if resolved != ONEFLOW and not is_onnx(path):
        try:
            return open_converted(path, threads, resolved)
        except DataError as e:
            if engine != AUTO:
                raise
            backend = OneFlowBackend(path, device=device, graph=graph, threads=threads)  # its own refusal first
            backend.fallback = str(e)  # e.g. a bilinear model, which OneFlow's converter cannot take
            return backend
    kind = backend_class(path, resolved)
    if kind is OpenVinoBackend:
        return OpenVinoBackend(path, threads, ENGINES[resolved])
    return kind(path, device=device, graph=graph, threads=threads)


def open_converted(path, threads, engine):
    """A OneFlow checkpoint converted to ONNX (in a temporary folder, gone once the runtime holds the model) and run
    in `engine`. The converter runs in a child: it compiles an nn.Graph, prints OneFlow's log and makes its own
    copies of the weights (peaks of 0.6 GB at width 16, 3.4 GB at width 64), all of which end with the child."""
    with tempfile.TemporaryDirectory(prefix="isbi-unet-convert-") as folder:
        onnx = os.path.join(folder, "model.onnx")
        convert_checkpoint(path, onnx)
        backend = open_model(onnx, threads=threads, engine=engine)
    backend.converted = True
    return backend


def convert_checkpoint(path, out):
    """`python3 -m isbi_unet.onnx_export path out`; its `error:` line becomes this process's DataError."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "isbi_unet.onnx_export", os.path.abspath(path), out]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode in (130, -signal.SIGINT):  # a Ctrl-C on the terminal reached the child first
        raise KeyboardInterrupt
    if proc.returncode:
        said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        reason = said[-1][len("error: ") :] if said else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{path}: could not be converted to ONNX (exit {proc.returncode}): {reason}")


def uses_every_core(paths, engine=ONEFLOW, device="cpu", graph=False):
    """Whether every model's runtime spreads itself over the cores, so that one process is enough."""
    return all(backend_class(p, runs_in(p, engine, device, graph)).uses_every_core for p in paths)


def threads_per_process(workers):
    """ONNX Runtime's threads in each of `workers` processes: the cores, shared out."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def common_input_size(backends):
    """The input size the fixed-size models share (None without any); two different sizes are refused."""
    sizes = sorted({b.input_size for b in backends if b.input_size})
    if len(sizes) > 1:
        raise DataError(f"the .onnx models take different input sizes {sizes}; export them at one --size")
    return sizes[0] if sizes else None


class Spec(NamedTuple):
    """What a process needs to build a Predictor: small and picklable, so each pool worker builds its own."""

    checkpoints: tuple
    device: str = "cpu"
    graph: bool = False
    tile: int = 0
    overlap: int = 64
    tta: bool = False
    threads: Optional[int] = None
    engine: str = ONEFLOW  # what runs the models (CHOICES); the command's default is AUTO


class Predictor:
    """uint8 HxW slice -> float32 HxW cell probability: the mean over `backends`, tiled and flipped as set."""

    def __init__(self, backends, tile, overlap, tta, spec=None):
        self.backends, self.tile, self.overlap, self.tta, self.spec = list(backends), tile, overlap, tta, spec
        self.states = [b.state for b in self.backends]  # checkpoint dicts, for run.json and the summary
        self.runtimes = {b.runtime for b in self.backends}
        self.size = common_input_size(self.backends)
        if self.size:
            fixed_tile((self.size, self.size), self.size, tile)  # refuses a --tile the models cannot take

    @classmethod
    def open(cls, spec):
        """Loads every model of `spec` once, in order; the first bad one raises its DataError."""
        backends = [open_model(c, spec.device, spec.graph, spec.threads, spec.engine) for c in spec.checkpoints]
        return cls(backends, spec.tile, spec.overlap, spec.tta, spec)

    def release(self):
        """Lets this process's models go, for workers that load their own; returns the spec they load."""
        self.backends = []
        return self.spec

    def probabilities(self, batch):
        """The members' mean, summed in order: one member's map comes back exactly."""
        return sum(b.probabilities(batch) for b in self.backends) / len(self.backends)

    def plan(self, shape):
        """(tile, overlap) for an image of `shape`: as set, or tiles of the fixed input size where it needs them."""
        if not self.size:
            return self.tile, self.overlap
        tile = fixed_tile(shape, self.size, self.tile)
        return tile, min(self.overlap, tile - POOL) if tile else self.overlap

    def __call__(self, image):
        return self.window(preprocess(image))

    def window(self, x):
        """float32 hxw cell probability of a standardised float32 1xhxw window (a whole slice, or a block's window:
        isbi_unet/blocks.py) in one pass, flipped as set; a fixed-size ONNX model tiles it at its size."""
        tile, overlap = self.plan(x.shape)
        return predict_tiled(self.probabilities, x, tile=tile, overlap=overlap, tta=self.tta)[0]

    def tiling_note(self, shapes):
        """The line saying which images a fixed input size makes tiled; None when none is, or tiles were asked."""
        tiled = [s for s in shapes if fixed_tile(s, self.size)] if self.size and not self.tile else []
        if not tiled:
            return None
        return (
            f"{len(tiled)} of {len(shapes)} images (e.g. {tiled[0][1]}x{tiled[0][0]}) differ from the ONNX "
            f"export's {self.size}x{self.size}: overlap-tile inference at {self.size}"
        )

    def record(self):
        """run.json's fields on the models: scalars for one, lists for an ensemble."""
        epochs, configs = [s.get("epoch") for s in self.states], [s["model_config"] for s in self.states]
        runtimes = [runtime_name(b) for b in self.backends] if self.backends else None
        one = len(self.states) == 1
        return {
            "checkpoint_epoch": epochs[0] if one else epochs,
            "model_config": configs[0] if one else configs,
            "runtime": runtimes[0] if one and runtimes else runtimes,
        }

    def describe_settings(self):
        """`, tiles 256, TTA, graph, ONNX Runtime`: what the summary line names of how the maps were made."""
        tiles = f", tiles {self.tile}" if self.tile else ""
        graph = ", graph" if self.spec and self.spec.graph else ""
        names = list(dict.fromkeys(runtime_name(b) for b in self.backends))
        engines = "" if names == ["OneFlow"] else ", " + " and ".join(names)
        return f"{tiles}{', TTA' if self.tta else ''}{graph}{engines}"

    def describe(self):
        """`UNet{config}, epoch E` for one model, `mean of N checkpoints, epochs E1, E2` for an ensemble."""
        if len(self.states) == 1:
            return f"UNet{self.states[0]['model_config']}, epoch {self.states[0].get('epoch')}"
        epochs = ", ".join(str(s.get("epoch")) for s in self.states)
        return f"mean of {len(self.states)} checkpoints, epochs {epochs}"


def runtime_name(backend):
    """`ONNX Runtime`, `OpenVINO bf16`, `OneFlow`, with `(converted)` for a checkpoint converted as it loaded."""
    name = backend.runtime + (f" {backend.precision}" if isinstance(backend, OpenVinoBackend) else "")
    return name + (" (converted)" if getattr(backend, "converted", False) else "")


@functools.lru_cache(maxsize=1)
def worker_predictor(spec):
    """This worker process's predictor: built by its first task, so a load error reaches the parent as one."""
    return Predictor.open(spec)


def predict_in_worker(spec, image):
    return worker_predictor(spec)(image)
